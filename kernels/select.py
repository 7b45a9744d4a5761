"""Which implementation runs a bit-plane SEFP linear: a pure function of its inputs.

Nothing here imports Triton or touches a device; the caller passes what it knows (whether Triton
imports, whether ``TRITON_INTERPRET=1`` is set) so that every case is testable on any machine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

from otaro.formats.table import SEFPFormat

from .derive import ROUNDING_IDS

TRITON = "triton-sefp-matmul"
REFERENCE = "torch-reference"

# Beyond this many rows each 16-row tile re-decodes the whole weight; dequantizing once and
# using a dense GEMM is the better plan there (a bit-plane GEMM kernel is not built yet).
MAX_M = 64


@dataclass(frozen=True)
class KernelChoice:
    name: str  # TRITON or REFERENCE
    reason: str  # one line, for logs and benchmark tables

    @property
    def is_triton(self) -> bool:
        return self.name == TRITON


def select_kernel(fmt, m: int, k: int, n: int, device, *, triton_available: bool, interpreter: bool) -> KernelChoice:
    """The kernel for ``x [m, k] @ W^T`` (W ``[n, k]`` in ``fmt``) on ``device`` (a torch.device
    or its string). Falls back to the torch reference whenever the Triton kernel cannot run."""
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if not isinstance(fmt, SEFPFormat):
        return KernelChoice(REFERENCE, f"{getattr(fmt, 'name', fmt)} is not an SEFP format")
    if fmt.rounding not in ROUNDING_IDS:
        return KernelChoice(REFERENCE, f"rounding {fmt.rounding!r} has no Triton derivation")
    if not triton_available:
        return KernelChoice(REFERENCE, "Triton is not installed")
    if device_type == "cpu" and not interpreter:
        return KernelChoice(REFERENCE, "CPU tensors run Triton only under TRITON_INTERPRET=1")
    if device_type not in ("cpu", "cuda"):
        return KernelChoice(REFERENCE, f"no Triton backend for {device_type} tensors")
    if m < 1 or k < 1 or n < 1:
        return KernelChoice(REFERENCE, f"empty matmul ({m}x{k} @ {k}x{n})")
    if m > MAX_M:
        return KernelChoice(REFERENCE, f"M={m} > {MAX_M}: dequantize + dense GEMM beats re-decoding per tile")
    where = "interpreter" if device_type == "cpu" else "GPU"
    return KernelChoice(TRITON, f"bit-plane GEMV/GEMM ({where}, M={m})")


def triton_available() -> bool:
    """Whether Triton is installed, without importing it (importing costs seconds; a broken
    install that fails at import is caught by ``sefp_linear``'s fallback instead)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"
