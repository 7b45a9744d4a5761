"""AWQ GEMM layout (``quant_method: awq``, ``version: gemm``), as AutoAWQ writes it and AutoAWQ,
transformers' AWQ integration and onnxruntime-genai's model builder read it. 4-bit only.

Per quantized linear (K = in_features, N = out_features, G = group size)::

    qweight  int32 [K, N/8]    codes packed along N, 8 per word, in AWQ's interleaved order
    qzeros   int32 [K/G, N/8]  zero points (no offset), same packing
    scales   fp16  [K/G, N]
    bias     (optional, the model's dtype)

Word ``c`` of a row holds, in its nibble ``i`` (bits 4i .. 4i+3), the value of output column
``8c + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (AutoAWQ's ``WQLinear_GEMM.from_linear``;
onnxruntime-genai's ``AWQModel.reverse_reorder_tensor`` undoes it). There is no ``g_idx``: groups
are contiguous runs of G input columns, so an act-order permutation cannot be written here.
Symmetric formats are written with zero points 2^(b-1) (AWQ kernels always subtract them).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from otaro.errors import CheckpointError, FormatError
from otaro.formats import IntFormat
from otaro.hf.layouts import LayerCodes, Layout, plain_g_idx, register_layout

BITS = (4,)
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
PER_WORD = 8


def pack_interleaved(u: np.ndarray) -> np.ndarray:
    """uint 4-bit values [R, N] (N a multiple of 8) -> int32 [R, N/8] in AWQ's order."""
    u = np.asarray(u)
    R, N = u.shape
    if N % PER_WORD:
        raise FormatError(f"AWQ packs 8 output columns per word; {N} is not a multiple of 8")
    if u.size and (u.min() < 0 or u.max() > 15):
        raise FormatError(f"values [{u.min()}, {u.max()}] do not fit 4 bits")
    nib = u.astype(np.uint32).reshape(R, N // PER_WORD, PER_WORD)[:, :, ORDER]
    words = np.zeros((R, N // PER_WORD), dtype=np.uint32)
    for i in range(PER_WORD):  # 8 whole-array steps
        words |= nib[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def unpack_interleaved(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_interleaved`: int32 [R, N/8] -> uint8 [R, N]."""
    w = np.ascontiguousarray(np.asarray(words))
    if w.ndim != 2 or w.dtype not in (np.int32, np.uint32):
        raise FormatError(f"AWQ packed words must be int32 [rows, N/8], got {w.dtype} {w.shape}")
    w = w.view(np.uint32)
    R, C = w.shape
    nib = np.stack([(w >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(PER_WORD)], axis=-1)
    out = np.empty((R, C, PER_WORD), dtype=np.uint8)
    out[:, :, ORDER] = nib
    return out.reshape(R, C * PER_WORD)


def pack(t: LayerCodes) -> dict[str, np.ndarray]:
    if not np.array_equal(t.g_idx, plain_g_idx(t.in_features, t.group_size)):
        raise FormatError("the AWQ layout has no g_idx: a layer whose groups are not contiguous runs of "
                          "columns (act-order without static groups) cannot be written in it")
    return {
        "qweight": pack_interleaved(t.codes.T),
        "qzeros": pack_interleaved(t.zeros.T),
        "scales": np.ascontiguousarray(t.scales.T.astype(np.float16)),
    }


def unpack(tensors: Mapping[str, np.ndarray], qcfg: dict, bits: int, group_size: int) -> LayerCodes:
    qweight, qzeros, scales = (np.asarray(tensors[k]) for k in ("qweight", "qzeros", "scales"))
    groups, N = scales.shape
    K = qweight.shape[0]
    if qweight.shape[1] * PER_WORD != N or qzeros.shape != (groups, N // PER_WORD):
        raise CheckpointError(f"AWQ tensors qweight {qweight.shape}, qzeros {qzeros.shape}, scales {scales.shape} "
                              "do not describe one 4-bit layer")
    if groups * group_size != K:
        raise CheckpointError(f"AWQ scales have {groups} groups of {group_size} for {K} inputs")
    codes = unpack_interleaved(qweight).T
    zeros = unpack_interleaved(qzeros).T
    return LayerCodes(np.ascontiguousarray(codes), np.ascontiguousarray(zeros),
                      np.ascontiguousarray(scales.T.astype(np.float32)), plain_g_idx(K, group_size), bits, group_size)


def check_format(fmt: IntFormat) -> None:
    return None  # BITS (4) is checked by layouts.check_format


def check_shape(name: str, in_features: int, out_features: int, fmt: IntFormat) -> None:
    if out_features % PER_WORD:
        raise FormatError(f"the AWQ layout packs 8 outputs per int32; {name} has {out_features} outputs")
    if in_features % fmt.group_size:
        raise FormatError(f"{name} has {in_features} inputs, not a multiple of the group size {fmt.group_size} "
                          f"(AutoAWQ and onnxruntime-genai read whole groups only); choose a group size dividing it")


def shape_of(shapes: Mapping[str, tuple[int, ...]], bits: int) -> tuple[int, int]:
    return int(shapes["qweight"][0]), int(shapes["scales"][1])


def quantization_config(fmt: IntFormat, method: dict) -> dict:
    return {"quant_method": "awq", "version": "gemm", "bits": fmt.bits, "group_size": fmt.group_size,
            "zero_point": True, "modules_to_not_convert": None}


def read_config(qcfg: dict) -> tuple[int, int]:
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"AWQ version {version!r} is not read (gemm is)")
    if qcfg.get("zero_point") is False:
        raise CheckpointError("AWQ folders without zero points are not read")
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    group = qcfg.get("group_size", qcfg.get("q_group_size"))
    if bits not in BITS:
        raise CheckpointError(f"AWQ bits {bits!r}: only 4-bit GEMM folders are read")
    if not isinstance(group, int) or group <= 0:
        raise CheckpointError(f"AWQ group_size {group!r} is not read (groups of 16-256 are)")
    return int(bits), int(group)


LAYOUT = register_layout(Layout(
    name="awq", quant_method="awq", description="AWQ GEMM: 4-bit, packed along N in order [0,2,4,6,1,3,5,7]",
    bits=BITS, check_format=check_format, check_shape=check_shape, pack=pack, unpack=unpack, shape_of=shape_of,
    suffixes=("qweight", "qzeros", "scales"), optional=(),
    quantization_config=quantization_config, read_config=read_config,
))
