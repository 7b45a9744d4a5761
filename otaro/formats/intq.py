"""Integer group quantization reference (numpy): RTN and the shared encode given scales.

Asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w ≈ (q - z) · s``; the range always
contains 0 (as in the GPTQ reference) so zero is exact. Symmetric: ``q = clamp(round(w / s),
-(2^(b-1) - 1), 2^(b-1) - 1)``, ``w ≈ q · s``. Scales are rounded to fp16 *before* the codes are
computed, because deployment stores fp16 scales: torch eval and the exported model then agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from otaro.formats.sefp import check_finite, pad_groups
from otaro.formats.table import IntFormat


@dataclass(frozen=True)
class IntTensor:
    """codes int16 [out, in_padded] (unsigned for asym, signed for sym), scale float32 [out,
    groups] (fp16-representable), zero int16 [out, groups] (zeros for sym)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    in_features: int
    fmt: IntFormat


def rtn_params(w: np.ndarray, fmt: IntFormat) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest scale and zero point per group of a padded [out, in_p] weight."""
    out, in_p = w.shape
    g = w.reshape(out, in_p // fmt.group_size, fmt.group_size)
    if fmt.symmetric:
        amax = np.abs(g).max(-1)
        scale = amax / fmt.qmax
        zero = np.zeros_like(scale, dtype=np.int16)
    else:
        lo = np.minimum(g.min(-1), 0.0)
        hi = np.maximum(g.max(-1), 0.0)
        scale = (hi - lo) / fmt.qmax
    scale = scale.astype(np.float16).astype(np.float32)
    # An all-zero group (or one whose scale underflows fp16) gets scale 1: its codes are all
    # the zero point and it decodes to exact zeros.
    scale = np.where(scale > 0, scale, np.float32(1.0))
    if not fmt.symmetric:
        zero = np.clip(np.rint(-lo / scale), 0, fmt.qmax).astype(np.int16)
    return scale, zero


def encode_with(w: np.ndarray, fmt: IntFormat, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    out, in_p = w.shape
    g = w.reshape(out, in_p // fmt.group_size, fmt.group_size)
    q = np.rint(g / scale[..., None]) + zero[..., None]
    return np.clip(q, fmt.qmin, fmt.qmax).astype(np.int16).reshape(out, in_p)


def encode(w: np.ndarray, fmt: IntFormat, name: str = "weight") -> IntTensor:
    w = np.asarray(w)
    check_finite(w, name)
    in_features = w.shape[1]
    w32 = pad_groups(w.astype(np.float32), fmt.group_size)
    scale, zero = rtn_params(w32, fmt)
    return IntTensor(encode_with(w32, fmt, scale, zero), scale, zero, in_features, fmt)


def decode(t: IntTensor) -> np.ndarray:
    out, in_p = t.codes.shape
    G = t.fmt.group_size
    g = (t.codes.reshape(out, in_p // G, G) - t.zero[..., None]).astype(np.float32) * t.scale[..., None]
    return np.ascontiguousarray(g.reshape(out, in_p)[:, : t.in_features])
