"""GPTQ v1 layout (``checkpoint_format: gptq``), as AutoGPTQ writes it and AutoGPTQ, GPTQModel,
transformers/optimum's GPTQ integration and onnxruntime-genai's model builder read it.

Per quantized linear (K = in_features, N = out_features, G = group size, b = bits)::

    qweight  int32 [K*b/32, N]    codes packed along K, low bits first
    qzeros   int32 [K/G, N*b/32]  (zero point - 1) packed along N, low bits first (the v1 offset)
    scales   fp16  [K/G, N]
    g_idx    int32 [K]            group of each input column
    bias     (optional, the model's dtype)

Packing is one little-endian bit stream per column (qweight) or row (qzeros): value ``i`` sits at
bits ``i*b .. i*b+b-1`` of the stream, word ``w`` holds stream bits ``32w .. 32w+31``. For
b ∈ {2, 4, 8} no value crosses a word; for b = 3 every 32 values fill three words and values
10 and 21 of each run straddle a word boundary — exactly AutoGPTQ's 3-bit packer. The v1
offset of a zero point 0 wraps to 2^b - 1 inside its field (AutoGPTQ's own packer would smear
the borrow into the neighbouring fields; we mask it); readers that add 1 and mask, as
onnxruntime-genai and GPTQModel's v1 → v2 conversion do, get 0 back. ``gptq_v2`` (no offset)
is read too. A symmetric format's code q is stored q + 2^(b-1) with zero 2^(b-1) (stored
2^(b-1) - 1). ``desc_act`` is written false: otaro's act-order uses static groups, so g_idx is
column // G (see :func:`quantization_config`).

Shapes: AutoGPTQ sizes ``qweight`` as ``K // 32 * b`` rows and ``qzeros`` as ``N // 32 * b``
columns, so K and N must be multiples of 32; onnxruntime-genai's reader takes K // G groups and
AutoAWQ asserts K % G == 0, so ragged groups are refused at write time rather than written into a
folder its main consumer misreads.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from otaro.errors import CheckpointError, FormatError
from otaro.formats import IntFormat
from otaro.hf.layouts import LayerCodes, Layout, plain_g_idx, register_layout

BITS = (2, 3, 4, 8)
WORD = 32


def pack_stream(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [L, M] (L * bits a multiple of 32) -> int32 [L * bits / 32, M], each column
    one little-endian bit stream (value l at stream bits l*bits ...)."""
    u = np.asarray(u)
    L, M = u.shape
    if (L * bits) % WORD:
        raise FormatError(f"{L} values of {bits} bits do not fill whole 32-bit words")
    if u.size and (u.min() < 0 or u.max() >= 2**bits):
        raise FormatError(f"values [{u.min()}, {u.max()}] do not fit {bits} bits")
    u = u.astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    planes = ((u[:, None, :] >> shifts[None, :, None]) & np.uint8(1)).reshape(L * bits, M)
    packed = np.packbits(planes, axis=0, bitorder="little").reshape(L * bits // WORD, 4, M).astype(np.uint32)
    words = packed[:, 0] | (packed[:, 1] << 8) | (packed[:, 2] << 16) | (packed[:, 3] << 24)
    return np.ascontiguousarray(words).view(np.int32)


def unpack_stream(words: np.ndarray, bits: int, length: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_stream`: int32 [R, M] -> uint8 [length (default R*32/bits), M]."""
    w = np.ascontiguousarray(np.asarray(words))
    if w.ndim != 2 or w.dtype not in (np.int32, np.uint32):
        raise FormatError(f"packed words must be int32 [rows, M], got {w.dtype} {w.shape}")
    R, M = w.shape
    n = R * WORD // bits if length is None else length
    if n * bits > R * WORD:
        raise FormatError(f"{R} words hold {R * WORD // bits} values of {bits} bits, not {n}")
    w = w.view(np.uint32)
    b = np.stack([((w >> np.uint32(8 * i)) & np.uint32(0xFF)).astype(np.uint8) for i in range(4)], axis=1)
    planes = np.unpackbits(b.reshape(R * 4, M), axis=0, bitorder="little")[: n * bits].reshape(n, bits, M)
    out = np.zeros((n, M), dtype=np.uint16)
    for i in range(bits):  # at most 8 whole-array steps
        out |= planes[:, i, :].astype(np.uint16) << i
    return out.astype(np.uint8)


def pack(t: LayerCodes, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """LayerCodes -> {qweight, qzeros, scales, g_idx} in the GPTQ v1 (or v2) layout."""
    b = t.bits
    mask = (1 << b) - 1
    zeros = t.zeros.astype(np.int16)
    stored = (zeros - 1) & mask if checkpoint_format == "gptq" else zeros
    return {
        "qweight": pack_stream(t.codes.T, b),
        "qzeros": np.ascontiguousarray(pack_stream(stored.astype(np.uint8), b).T),
        "scales": np.ascontiguousarray(t.scales.T.astype(np.float16)),
        "g_idx": np.ascontiguousarray(t.g_idx.astype(np.int32)),
    }


def unpack(tensors: Mapping[str, np.ndarray], qcfg: dict, bits: int, group_size: int) -> LayerCodes:
    """{qweight, qzeros, scales[, g_idx]} -> LayerCodes (inverse of :func:`pack`)."""
    qweight, qzeros, scales = (np.asarray(tensors[k]) for k in ("qweight", "qzeros", "scales"))
    groups, N = scales.shape
    g_idx = tensors.get("g_idx")
    K = int(g_idx.shape[0]) if g_idx is not None else qweight.shape[0] * WORD // bits
    if qweight.shape[1] != N or qweight.shape[0] * WORD < K * bits:
        raise CheckpointError(f"qweight {qweight.shape} does not hold a [{K}, {N}] {bits}-bit weight")
    if qzeros.shape[0] != groups or qzeros.shape[1] * WORD < N * bits:
        raise CheckpointError(f"qzeros {qzeros.shape} does not hold [{groups}, {N}] {bits}-bit zero points")
    codes = unpack_stream(qweight, bits, K).T
    zeros = unpack_stream(np.ascontiguousarray(qzeros.T), bits, N).astype(np.int16)  # [N, groups]
    if _checkpoint_format(qcfg) == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    g = plain_g_idx(K, group_size) if g_idx is None else np.asarray(g_idx).astype(np.int32)
    return LayerCodes(np.ascontiguousarray(codes), np.ascontiguousarray(zeros.astype(np.uint8)),
                      np.ascontiguousarray(scales.T.astype(np.float32)), g, bits, group_size)


def _checkpoint_format(qcfg: dict) -> str:
    return str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))).lower()


def check_format(fmt: IntFormat) -> None:
    return None  # every bit-width in BITS, symmetric or not


def check_shape(name: str, in_features: int, out_features: int, fmt: IntFormat) -> None:
    G = fmt.group_size
    if in_features % WORD or out_features % WORD:
        raise FormatError(f"the GPTQ layout needs in/out features divisible by 32 (AutoGPTQ's qweight/qzeros "
                          f"shapes); {name} is [{out_features}, {in_features}]")
    if in_features % G:
        raise FormatError(f"{name} has {in_features} inputs, not a multiple of the group size {G}: "
                          f"onnxruntime-genai's reader takes K // G groups; choose a group size dividing {in_features}")


def shape_of(shapes: Mapping[str, tuple[int, ...]], bits: int) -> tuple[int, int]:
    K = shapes["g_idx"][0] if "g_idx" in shapes else shapes["qweight"][0] * WORD // bits
    return int(K), int(shapes["qweight"][1])


def quantization_config(fmt: IntFormat, method: dict) -> dict:
    cfg = (method or {}).get("config") or {}
    act_order = bool(cfg.get("act_order", False)) if method.get("name") == "gptq" else False
    out = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": fmt.bits,
        "group_size": fmt.group_size,
        # otaro's GPTQ runs act-order with static groups: columns visited by decreasing Hessian
        # diagonal, every group's parameters fixed up front, so g_idx is column // G. desc_act
        # tells loaders whether g_idx permutes groups, and ours never does: with desc_act true,
        # onnxruntime-genai feeds g_idx to MatMulNBits, whose CPU kernel (ORT 1.32) then
        # misreads packed zero points (measured: wrong outputs). The act-order itself is
        # recorded in static_groups and in meta.otaro.method.config.act_order.
        "desc_act": False,
        "static_groups": act_order,
        "sym": fmt.symmetric,
        "true_sequential": True,
        "lm_head": False,
    }
    damp = cfg.get("damp")
    if method.get("name") == "gptq" and isinstance(damp, (int, float)) and 0 < damp < 1:
        out["damp_percent"] = float(damp)
    return out


def read_config(qcfg: dict) -> tuple[int, int]:
    fmt = _checkpoint_format(qcfg)
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"GPTQ checkpoint_format {fmt!r} is not read (gptq, gptq_v2 are)")
    bits, group = qcfg.get("bits"), qcfg.get("group_size")
    if bits not in BITS:
        raise CheckpointError(f"GPTQ bits {bits!r} is not one of {list(BITS)}")
    if not isinstance(group, int) or group <= 0:
        raise CheckpointError(f"GPTQ group_size {group!r} is not read (otaro's int formats have groups of "
                              "16-256 weights; per-column -1 is not one of them)")
    if qcfg.get("lm_head"):
        raise CheckpointError("GPTQ folders with a quantized lm_head are not read (otaro keeps the head in float)")
    return int(bits), int(group)


def side_files(qcfg: dict) -> dict[str, dict]:
    # AutoGPTQ reads quantize_config.json beside the weights; transformers reads config.json.
    return {"quantize_config.json": {**qcfg, "model_file_base_name": "model"}}


LAYOUT = register_layout(Layout(
    name="gptq", quant_method="gptq", description="GPTQ v1: qweight packed along K, qzeros = zero - 1",
    bits=BITS, check_format=check_format, check_shape=check_shape, pack=pack, unpack=unpack, shape_of=shape_of,
    suffixes=("qweight", "qzeros", "scales", "g_idx"), optional=("g_idx",),
    quantization_config=quantization_config, read_config=read_config, side_files=side_files,
))
