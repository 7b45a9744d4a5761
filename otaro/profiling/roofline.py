"""The roofline model of an artifact: bytes and FLOPs per token at each bit-width, and what a
device's bandwidth and compute peaks allow.

Decode at batch 1 reads every weight once per token and does ~2 FLOPs per weight: it is
memory-bound on every device in ``devices/``, so ``tokens/s <= bandwidth / bytes per token``.
The bytes are counted from the artifact's own graph and manifest, at the precision the runtime
actually runs (:mod:`otaro.runtime.switch`):

* each quantized linear ``[K, N]`` runs as a ``MatMulNBits`` in the backend's container for its
  code (CPU: 2/4/8 bits, so b = 3 reads the 4-bit container and b = 5..7 the 8-bit one):
  ``N * ceil(K/G) * G * c / 8`` bytes of codes + ``N * ceil(K/G) * 4`` bytes of fp32 scales; a
  code no container holds (midpoint at 8 bits) is folded to an fp32 weight, ``4 K N`` bytes;
* every float initializer consumed by anything but a ``Gather`` is read in full (the LM head —
  fp32, a Transpose of the embedding when tied — the norms);
* a table consumed by ``Gather`` (the embedding) costs one row per token (on top of the full
  read when the tied head reads it too);
* the KV cache: attention reads K and V of every earlier position of every layer.

Pure arithmetic once :meth:`ModelShape.from_artifact` has read the graph: the tests check it
against hand-computed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

# MatMulNBits keeps one fp32 scale per block (no zero points in our layout): runtime/switch.py.
SCALE_BYTES = 4
FLOAT_WEIGHT_BYTES = 4  # a folded float weight (no container) is fp32
# A device "fits" a footprint when it is at most this fraction of its memory: the OS, the
# runtime's own allocations (onnxruntime arenas, pre-packed copies) and other processes need
# the rest. A rule of thumb, stated as one in the report.
FIT_FRACTION = 0.8


@dataclass(frozen=True)
class QLayer:
    name: str
    K: int
    N: int
    bits: int | None = None  # a precision of its own (a quantized head, otaro.head); None: the model's


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs to know about one artifact."""

    layers: tuple[QLayer, ...]
    group_size: int
    extra_code_bits: int  # the rounding's extra code bits (midpoint: 1)
    bits: tuple[int, ...]  # the bit-widths the artifact carries
    float_read_bytes: int  # float initializers read in full every token
    float_matmul_params: int  # of those, 2-D MatMul operands (the head): 2 FLOPs per parameter per token
    gather_row_bytes: int  # one row of every row-read table (Gather, rotary caches): read once per token
    float_stored_bytes: int  # every float initializer (memory)
    kv_bytes_per_position: int  # K and V of every layer for one position, batch 1
    n_layers: int
    attn_dim: int | None  # query heads x head dim (attention FLOPs); None if the config lacks it
    master_bytes: int  # model.onnx_data, held in memory by the runtime to switch

    def code_bits(self, bits: int) -> int:
        return bits + self.extra_code_bits

    @property
    def quantized_params(self) -> int:
        return sum(l.K * l.N for l in self.layers)

    # -- bytes ------------------------------------------------------------------------------

    def quantized_bytes(self, bits: int, container_for: Callable[[int], int | None]) -> dict[str, int]:
        """Bytes of the quantized linears at ``bits``: {"codes", "scales", "folded"} (folded =
        layers without a container, run as fp32 weights)."""
        G = self.group_size
        codes = scales = folded = 0
        for l in self.layers:
            c = container_for(self.code_bits(bits if l.bits is None else l.bits))
            blocks = -(-l.K // G)
            if c is None:
                folded += l.K * l.N * FLOAT_WEIGHT_BYTES
            else:
                codes += l.N * blocks * G * c // 8
                scales += l.N * blocks * SCALE_BYTES
        return {"codes": codes, "scales": scales, "folded": folded}

    def kv_read_bytes(self, positions: float) -> float:
        """KV bytes attention reads for one new token with ``positions`` tokens before it."""
        return self.kv_bytes_per_position * positions

    def decode_bytes(self, bits: int, container_for: Callable[[int], int | None], positions: float) -> dict[str, float]:
        """Bytes read for one decoded token at ``bits`` with ``positions`` tokens of context."""
        q = self.quantized_bytes(bits, container_for)
        out = {"codes": q["codes"], "scales": q["scales"], "folded": q["folded"], "float": self.float_read_bytes,
               "gather": self.gather_row_bytes, "kv": self.kv_read_bytes(positions)}
        out["total"] = sum(out.values())
        return out

    def decode_flops(self, positions: float) -> float:
        """FLOPs of one decoded token: 2 per weight of every matmul + attention over the context."""
        attn = 4 * self.n_layers * (self.attn_dim or 0) * positions  # QK^T and AV
        return 2 * (self.quantized_params + self.float_matmul_params) + attn

    def prefill_flops(self, tokens: int) -> float:
        attn = 2 * self.n_layers * (self.attn_dim or 0) * tokens * tokens  # causal: half of 4 T^2 d
        return 2 * (self.quantized_params + self.float_matmul_params) * tokens + attn

    # -- memory -----------------------------------------------------------------------------

    def footprint(self, bits: int, container_for: Callable[[int], int | None], context: int) -> dict[str, int]:
        """Resident bytes: ``runtime`` = the switchable runtime (the master file held in memory +
        this precision's packed weights + the KV cache at ``context`` tokens); ``fixed`` = one
        fixed-precision file (packed weights + float parts + KV), the per-bit competitor."""
        q = self.quantized_bytes(bits, container_for)
        packed = q["codes"] + q["scales"] + q["folded"]
        kv = self.kv_bytes_per_position * context
        return {"runtime": self.master_bytes + packed + kv, "fixed": packed + self.float_stored_bytes + kv,
                "kv": kv, "packed": packed}

    # -- reading an artifact ----------------------------------------------------------------

    @classmethod
    def from_artifact(cls, root: str | Path, manifest: dict | None = None) -> "ModelShape":
        import json

        import numpy as np
        import onnx

        from otaro.formats.table import SEFPFormat
        from otaro.runtime.artifact import ArtifactError, read_manifest

        root = Path(root)
        m = manifest if manifest is not None else read_manifest(root)
        sefp = m["sefp"]
        fmt = SEFPFormat(group_size=sefp["group_size"], rounding=sefp["rounding"], scale=sefp.get("scale", "pow2"))
        try:
            proto = onnx.load(str(root / m["model"]["file"]), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError: a bad file, said in one line
            raise ArtifactError(f"{root / m['model']['file']} is not a readable ONNX model ({e})") from None
        g = proto.graph
        quantized = {f"{n}.{k}" for n in m["layers"] for k in ("mantissa", "scale8")}
        # Which initializers a token reads in full (MatMul operands, the tied head through its
        # Transpose) and which by rows: Gather's table (one row per token) and the rotary cos/sin
        # caches of the fused graph's GroupQueryAttention (one row per position; they are not
        # weights, so they add no FLOPs).
        gathered, full, matmul_inputs = set(), set(), set()
        for node in g.node:
            for i, x in enumerate(node.input):
                by_row = (node.op_type == "Gather" and i == 0) or node.op_type == "GroupQueryAttention"
                (gathered if by_row else full).add(x)
                if node.op_type in ("MatMul", "Gemm", "Transpose"):
                    matmul_inputs.add(x)
        float_read = gather_row = stored = matmul_params = 0
        for t in g.initializer:
            if t.name in quantized:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            if not np.issubdtype(dtype, np.floating):
                continue  # shape constants, the bits input
            n = math.prod(t.dims) if len(t.dims) else 1
            nbytes = n * dtype.itemsize
            stored += nbytes
            if t.name in full:  # a tied head reads the embedding in full (through a Transpose)
                float_read += nbytes
                if len(t.dims) == 2 and t.name in matmul_inputs:
                    matmul_params += n
            if t.name in gathered and len(t.dims) >= 1 and t.dims[0]:
                gather_row += (n // t.dims[0]) * dtype.itemsize
        kv = 0
        layers_kv = set()
        for inp in g.input:
            if not inp.name.startswith("past_key_values."):
                continue
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            if len(dims) != 4 or not dims[1] or not dims[3]:
                raise ArtifactError(f"input {inp.name} has shape {dims}, expected [batch, kv_heads, past, head_dim]")
            kv += dims[1] * dims[3] * onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).itemsize
            layers_kv.add(inp.name.split(".")[1])
        cfg = {}
        if (root / "config.json").is_file():
            try:
                cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cfg = {}
        heads = cfg.get("num_attention_heads")
        head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
        attn = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
        data = root / m["model"]["data"]
        return cls(
            layers=tuple(QLayer(n, r["in_features"], r["out_features"],
                                (m.get("head") or {}).get("bits") if n == (m.get("head") or {}).get("layer") else None)
                         for n, r in m["layers"].items()),
            group_size=fmt.group_size, extra_code_bits=fmt.code_bits(8) - 8, bits=tuple(m["bits"]),
            float_read_bytes=float_read, float_matmul_params=matmul_params, gather_row_bytes=gather_row,
            float_stored_bytes=stored, kv_bytes_per_position=kv,
            n_layers=len(layers_kv) or (m.get("architecture") or {}).get("num_hidden_layers") or 0,
            attn_dim=attn, master_bytes=data.stat().st_size if data.is_file() else 0)


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    bits: int
    container_bits: int | None
    bytes_per_token: dict[str, float]
    decode_tps: float  # min(memory bound, compute bound)
    memory_bound_tps: float
    compute_bound_tps: float | None
    bound: str  # "memory" | "compute"
    prefill_s: float | None  # max(prefill FLOPs / peak, weight bytes / bandwidth)
    footprint: dict[str, int]
    fits: bool | None  # the runtime footprint within FIT_FRACTION of memory; None: memory unknown


def predict(shape: ModelShape, bits: int, container_for: Callable[[int], int | None], bandwidth_bytes_per_s: float,
            peak_ops_per_s: float | None, prompt_len: int, gen_len: int,
            memory_bytes: int | None = None) -> Prediction:
    """The roofline at ``bits``: decode tokens/s averaged over a ``gen_len``-token continuation
    of a ``prompt_len``-token prompt (the KV read grows with the position; its mean is used)."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    positions = prompt_len + (gen_len - 1) / 2  # mean context seen by the decode steps
    b = shape.decode_bytes(bits, container_for, positions)
    mem_tps = bandwidth_bytes_per_s / b["total"]
    comp_tps = peak_ops_per_s / shape.decode_flops(positions) if peak_ops_per_s else None
    tps = min(mem_tps, comp_tps) if comp_tps else mem_tps
    weights_once = b["total"] - b["kv"]
    prefill = None
    if peak_ops_per_s:
        prefill = max(shape.prefill_flops(prompt_len) / peak_ops_per_s, weights_once / bandwidth_bytes_per_s)
    fp = shape.footprint(bits, container_for, prompt_len + gen_len)
    fits = fp["runtime"] <= FIT_FRACTION * memory_bytes if memory_bytes else None
    return Prediction(bits, container_for(shape.code_bits(bits)), b, tps, mem_tps, comp_tps,
                      "compute" if comp_tps and comp_tps < mem_tps else "memory", prefill, fp, fits)


def compute_kind(backend: str, accuracy_level: int) -> str:
    """Which compute peak a backend's MatMulNBits runs at: int8 activations at accuracy level 4
    on CPU, fp32 below; fp16 on CUDA."""
    if backend.endswith("cuda"):
        return "fp16"
    return "int8" if accuracy_level >= 4 else "fp32"


def shared_containers(bits: Sequence[int], shape: ModelShape, container_for) -> dict[int, list[int]]:
    """container -> the bit-widths that run in it (b = 3 in the 4-bit container on CPU, ...)."""
    out: dict[int, list[int]] = {}
    for b in bits:
        c = container_for(shape.code_bits(b))
        out.setdefault(c if c is not None else 32, []).append(b)
    return out
