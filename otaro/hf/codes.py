"""otaro's ``IntLinear`` buffers <-> the layout-neutral :class:`LayerCodes` (both directions exact).

``IntLinear`` keeps codes [N, K_padded] (signed int8 for symmetric formats, uint8 otherwise),
float32 scales and uint8 zero points per group; padding columns of a ragged last group hold the
code of a zero weight (the group's zero point), as every otaro method writes them.
"""

from __future__ import annotations

import numpy as np
import torch

from otaro.errors import CheckpointError, FormatError
from otaro.formats import IntFormat
from otaro.hf.layouts import LayerCodes, plain_g_idx


def _half(fmt: IntFormat) -> int:
    return 1 << (fmt.bits - 1)


def layer_codes(layer, name: str = "layer") -> LayerCodes:
    """The stored codes of an ``IntLinear`` (first ``in_features`` columns) as LayerCodes."""
    fmt: IntFormat = layer.fmt
    K, G = layer.in_features, fmt.group_size
    q = layer.qweight.detach().cpu().numpy()[:, :K].astype(np.int16)
    scales = layer.scales.detach().cpu().to(torch.float32).numpy()
    if not np.array_equal(scales.astype(np.float16).astype(np.float32), scales):
        raise FormatError(f"{name}: scales are not fp16 values; Hugging Face layouts store fp16 scales")
    if fmt.symmetric:
        q = q + _half(fmt)
        zeros = np.full(scales.shape, _half(fmt), dtype=np.uint8)
    else:
        zeros = layer.zeros.detach().cpu().numpy().astype(np.uint8)
    if q.size and (q.min() < 0 or q.max() >= 1 << fmt.bits):
        raise FormatError(f"{name}: codes [{q.min()}, {q.max()}] do not fit {fmt.bits} bits")
    return LayerCodes(np.ascontiguousarray(q.astype(np.uint8)), np.ascontiguousarray(zeros),
                      np.ascontiguousarray(scales), plain_g_idx(K, G), fmt.bits, G)


def int_linear(c: LayerCodes, fmt: IntFormat, bias: torch.Tensor | None, dtype: torch.dtype, name: str = "layer"):
    """An ``IntLinear`` holding exactly these codes (padding columns set to the zero weight's code)."""
    from otaro.modules import IntLinear

    N, K, G = c.out_features, c.in_features, fmt.group_size
    if c.bits != fmt.bits or c.group_size != G:
        raise CheckpointError(f"{name}: {c.bits}-bit codes in groups of {c.group_size} are not {fmt.name}")
    if not np.array_equal(c.g_idx, plain_g_idx(K, G)):
        raise CheckpointError(f"{name}: g_idx is not column // {G} (act-order without static groups); otaro's int "
                              "layout has contiguous groups: quantize the original model with otaro "
                              "(its GPTQ uses act-order with static groups)")
    groups = -(-K // G)
    if c.scales.shape != (N, groups) or c.zeros.shape != (N, groups):
        raise CheckpointError(f"{name}: scales {c.scales.shape} / zeros {c.zeros.shape}, expected ({N}, {groups})")
    codes = c.codes.astype(np.int16)
    zeros = c.zeros.astype(np.int16)
    if fmt.symmetric:
        if (zeros != _half(fmt)).any() or (codes.size and codes.min() < 1):
            raise CheckpointError(f"{name}: the folder says {fmt.name} but its zero points or codes are not symmetric")
        codes = codes - _half(fmt)
        zeros = np.zeros_like(zeros)
    in_p = groups * G
    full = np.empty((N, in_p), dtype=np.int16)
    full[:, :K] = codes
    full[:, K:] = zeros[:, -1:]  # a ragged last group's padding: the code of a zero weight
    mod = IntLinear(K, N, bias is not None, fmt, dtype=dtype)
    mod.qweight.copy_(torch.from_numpy(full).to(mod.qweight.dtype))
    mod.scales.copy_(torch.from_numpy(c.scales.astype(np.float32)))
    mod.zeros.copy_(torch.from_numpy(zeros.astype(np.uint8)))
    if bias is not None:
        mod.bias.data.copy_(bias.to(dtype))
    return mod
