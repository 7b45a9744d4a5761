"""Backends: where a precision's model runs. One registry, one pure selection function.

A backend is an onnxruntime execution provider plus the ``MatMulNBits`` containers it runs. A
b-bit SEFP code rides in the smallest container of the backend that holds it (a 2-bit code in
a 4-bit container is still exact: same signed code, zero point 2^(c-1)); a code wider than every
container (``midpoint`` at 8 bits needs 9) keeps its ``SefpMatMul`` node, which onnxruntime
folds to a float weight at load. A Triton GPU path (bit-plane kernels, per-call precision)
registers here as another :class:`Backend` when it lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from otaro.errors import OtaroError

# The onnxruntime session option that sets the accuracy level of the MatMulNBits it fuses from
# blocked DequantizeLinear + MatMul. Defined here, below the exporter (which writes it into
# genai_config.json): the runtime never imports the exporter.
ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
LUT_KEY = "mlas.use_lut_gemm"


@dataclass(frozen=True)
class Backend:
    name: str
    device: str
    providers: tuple[str, ...]  # in priority order; the first one is required
    containers: tuple[int, ...]
    install_hint: str


# CPU containers are checked on ORT 1.32 (docs/FACTS.md: 2/4/8). The CUDA kernel's are read from
# onnxruntime's docs, not run here (no GPU): 4 and 8, so 2- and 3-bit codes ride in 4 bits.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("onnxruntime-cpu", "cpu", ("CPUExecutionProvider",), (2, 4, 8), "pip install onnxruntime"),
        Backend("onnxruntime-cuda", "cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), (4, 8),
                # onnxruntime and onnxruntime-gpu install the same Python package: with both, the
                # one installed last owns its files, so the hint swaps one for the other.
                "onnxruntime-gpu in place of onnxruntime: pip uninstall -y onnxruntime onnxruntime-gpu && "
                "pip install onnxruntime-gpu"),
    )
}


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    device: str
    providers: tuple[str, ...]
    containers: tuple[int, ...]
    accuracy_level: int
    # onnxruntime's intra-op threads spin-wait for work by default: fastest on an idle machine,
    # but on a loaded one (or beside another engine) they burn the cores others need. False
    # sets session.intra_op.allow_spinning = 0 (what OMP_WAIT_POLICY=PASSIVE is to llama.cpp).
    spin: bool = True
    # A path prefix: every session this choice creates writes onnxruntime's profile (a
    # chrome-trace JSON of model runs and per-node kernel times) to PREFIX_<timestamp>.json
    # when it ends (Runtime.end_profiling); None: no profiling, onnxruntime's default.
    profile: str | None = None
    # Layers reading the same activation at the same bits (q/k/v, gate/up) run as one MatMulNBits
    # (otaro.runtime.switch.sibling_groups); False keeps one node per layer (for comparison).
    fuse_siblings: bool = True

    def container_for(self, code_bits: int) -> int | None:
        """Smallest container holding a signed ``code_bits``-bit code, or None (run dequantized)."""
        return next((c for c in self.containers if c >= code_bits), None)


def select_backend(device: str, available_providers: Sequence[str], accuracy_level: int = 4) -> BackendChoice:
    """The backend for ``device`` given the providers this onnxruntime has (pure: pass
    ``onnxruntime.get_available_providers()``). Raises OtaroError saying why none fits."""
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise OtaroError(f"accuracy level {accuracy_level!r} is not one of {list(ACCURACY_LEVELS)} "
                         f"(4 = int8 activations, fast; 1 = fp32 activations, exact)")
    candidates = [b for b in BACKENDS.values() if b.device == device]
    if not candidates:
        devices = sorted({b.device for b in BACKENDS.values()})
        raise OtaroError(f"device {device!r} is not supported: choose one of {devices}")
    available = set(available_providers)
    for b in candidates:
        if b.providers[0] in available:
            return BackendChoice(b.name, device, tuple(p for p in b.providers if p in available), b.containers,
                                 accuracy_level)
    need = ", ".join(f"{b.providers[0]} ({b.install_hint})" for b in candidates)
    have = ", ".join(available_providers) or "none"
    raise OtaroError(f"device {device!r} needs {need}; this onnxruntime has only: {have}")


def session_options(choice: BackendChoice, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Also governs the DequantizeLinear+MatMul fusion of a kept SefpMatMul node.
    so.add_session_config_entry(ACCURACY_KEY, str(choice.accuracy_level))
    so.log_severity_level = 3  # folding leftovers of the graph edit prints nothing useful
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if choice.device == "cpu" and choice.accuracy_level >= 4:
        # 2-bit MatMulNBits through MLAS's lookup-table kernel (T-MAC style: int8 tables of
        # activation sums, where N is a multiple of 128) instead of unpacking: ~1.1x decode at
        # b = 2 on SmolLM2 (RESULTS "engines"). It quantizes activations to int8 whatever the
        # node's accuracy_level says, so only the int8-activation level asks for it.
        so.add_session_config_entry(LUT_KEY, "1")
    if not choice.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if choice.profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(choice.profile)
    return so


# The folder onnxruntime resolves a graph's external data in when the graph comes as bytes.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def create_session(choice: BackendChoice, model: bytes, files: dict, shared: dict, threads: int | None = None,
                   folder=None):
    """(InferenceSession, what it borrows) from graph bytes, its external data and ``shared``
    initializers (borrowed, not copied: the returned OrtValues hold their arrays and must live
    as long as the session). External data comes from ``folder`` when given (files onnxruntime
    maps and reads once; otaro.runtime.spill), else from ``files``, in-memory files that
    onnxruntime copies into the session."""
    import numpy as np
    import onnxruntime as ort

    so = session_options(choice, threads)
    if folder is not None:
        so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(folder))
    else:
        names = list(files)
        bufs = [np.ascontiguousarray(files[n]) for n in names]
        so.add_external_initializers_from_files_in_memory(names, bufs, [b.nbytes for b in bufs])
    # add_initializer overrides the graph's copy; a constant folded from it (the tied head's
    # Transpose) comes from the graph's external data, which holds the same values.
    borrowed = tuple(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in shared.values())
    for name, value in zip(shared, borrowed):
        so.add_initializer(name, value)
    session = ort.InferenceSession(model, so, providers=list(choice.providers))
    check_provider(choice, session.get_providers())
    return session, borrowed


def check_provider(choice: BackendChoice, running: Sequence[str]) -> None:
    """onnxruntime drops a provider it cannot start (onnxruntime-gpu without the CUDA or cuDNN
    libraries it was built for) and runs on the CPU instead, printing to its log; a ``device``
    the user asked for is an error instead, not a silent CPU run."""
    need = choice.providers[0]
    if need not in running:
        raise OtaroError(f"onnxruntime could not start {need} for device {choice.device!r} (it fell back to "
                         f"{', '.join(running) or 'nothing'}): the CUDA and cuDNN libraries that this "
                         f"onnxruntime-gpu was built for must be installed and found (see onnxruntime's "
                         f"CUDA requirements for its version)")
