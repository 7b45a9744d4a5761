"""Torch twins of the numpy codecs, bit-exact with them (tests check every rounding and b).

These are what training and evaluation call, on any device: the fake-quant of fine-tuning goes
through the stored 8-bit code exactly as the runtime will derive it.
"""

from __future__ import annotations

import torch

from otaro.errors import FormatError
from otaro.formats.table import TOP_BITS, ZERO_GROUP_EXPONENT, IntFormat, SEFPFormat

_TOP_MAX = 2 ** (TOP_BITS - 1) - 1
_MIN_NORMAL = 2.0**-126


def check_finite(w: torch.Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise FormatError(f"tensor {name!r} has non-finite values ({n_nan} NaN, {n_inf} Inf); cannot quantize it")


def pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    pad = (-w.shape[1]) % group_size
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def sefp_encode(w: torch.Tensor, fmt: SEFPFormat, name: str = "weight", check: bool = True):
    """(mantissa int8 [out, in_p], exponent int8 [out, groups]) of a 2-D weight."""
    if w.dim() != 2:
        raise FormatError(f"tensor {name!r} must be 2-D [out, in] to encode, got shape {tuple(w.shape)}")
    if check:
        check_finite(w, name)
    G = fmt.group_size
    w32 = pad_groups(w.detach().to(torch.float32), G)
    out, in_p = w32.shape
    g = w32.reshape(out, in_p // G, G)
    mag = g.abs()
    amax = mag.amax(dim=-1)
    live = amax >= _MIN_NORMAL
    _, e = torch.frexp(torch.where(live, amax, torch.ones_like(amax)))
    E = torch.where(live, e.to(torch.int32) - 1, torch.full_like(e, ZERO_GROUP_EXPONENT, dtype=torch.int32))
    # |w| / Δ_8 = |w| · 2^(6-E). torch.ldexp multiplies by pow(2, e) computed in fp32, which
    # overflows to inf for e >= 128 (groups with E <= -122); split the shift in two halves
    # (each |half| <= 66, a normal power of two). Both products are exact where it matters:
    # the first only rescales, and any rounding of tiny values stays far below one Δ_8 step.
    shift = (TOP_BITS - 2 - E).unsqueeze(-1)
    half = torch.div(shift, 2, rounding_mode="floor")
    scaled = torch.ldexp(torch.ldexp(mag, half.to(torch.float32)), (shift - half).to(torch.float32))
    if fmt.rounding == "nearest":
        M8 = torch.clamp(torch.round(scaled), max=_TOP_MAX)  # round-half-even, like np.rint
    else:
        M8 = torch.floor(scaled)
    M8 = torch.where(live.unsqueeze(-1), M8, torch.zeros_like(M8)).to(torch.int16)
    m8 = torch.where(torch.signbit(g), -M8, M8).to(torch.int8).reshape(out, in_p)
    return m8, E.to(torch.int8)


def sefp_derive_codes(mantissa: torch.Tensor, bits: int, fmt: SEFPFormat) -> torch.Tensor:
    fmt.check_bits(bits)
    s = TOP_BITS - bits
    m = mantissa.to(torch.int16)
    M8 = m.abs()
    if fmt.rounding == "trunc":
        Mb = M8 >> s
    elif fmt.rounding == "nearest":
        Mb = M8 if s == 0 else torch.clamp((M8 >> s) + ((M8 >> (s - 1)) & 1), max=2 ** (bits - 1) - 1)
    else:  # midpoint: odd multiples of half a step; a stored zero stays zero
        Mb = torch.where(M8 > 0, 2 * (M8 >> s) + 1, torch.zeros_like(M8))
    return torch.where(m < 0, -Mb, Mb)


def sefp_dequantize(
    mantissa: torch.Tensor, exponent: torch.Tensor, bits: int, fmt: SEFPFormat, in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    codes = sefp_derive_codes(mantissa, bits, fmt)
    step = exponent.to(torch.int32) - bits + 2 - fmt.rounding_spec.extra_code_bits
    out, in_p = codes.shape
    G = fmt.group_size
    g = torch.ldexp(codes.reshape(out, in_p // G, G).to(torch.float32), step.unsqueeze(-1).to(torch.float32))
    return g.reshape(out, in_p)[:, :in_features].to(dtype)


def sefp_quantize(w: torch.Tensor, fmt: SEFPFormat, bits: int, check: bool = True) -> torch.Tensor:
    """Q(w, b): the float weight the device computes with at ``bits`` (no gradient)."""
    m8, e = sefp_encode(w, fmt, check=check)
    return sefp_dequantize(m8, e, bits, fmt, w.shape[1], dtype=w.dtype)


def int_rtn_params(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable float32) and zero (int16) per group of a padded weight."""
    out, in_p = w.shape
    g = w.reshape(out, in_p // fmt.group_size, fmt.group_size)
    if fmt.symmetric:
        scale = g.abs().amax(-1) / fmt.qmax
    else:
        lo = torch.clamp(g.amin(-1), max=0.0)
        hi = torch.clamp(g.amax(-1), min=0.0)
        scale = (hi - lo) / fmt.qmax
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if fmt.symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int16)
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, fmt.qmax).to(torch.int16)
    return scale, zero


def int_encode_with(w: torch.Tensor, fmt: IntFormat, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    out, in_p = w.shape
    g = w.reshape(out, in_p // fmt.group_size, fmt.group_size)
    q = torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return torch.clamp(q, fmt.qmin, fmt.qmax).to(torch.int16).reshape(out, in_p)


def int_encode(w: torch.Tensor, fmt: IntFormat, name: str = "weight"):
    """(codes int16, scale float32, zero int16) by round-to-nearest."""
    check_finite(w, name)
    w32 = pad_groups(w.detach().to(torch.float32), fmt.group_size)
    scale, zero = int_rtn_params(w32, fmt)
    return int_encode_with(w32, fmt, scale, zero), scale, zero


def int_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat, in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    out, in_p = codes.shape
    G = fmt.group_size
    g = (codes.reshape(out, in_p // G, G) - zero.unsqueeze(-1)).to(torch.float32) * scale.unsqueeze(-1)
    return g.reshape(out, in_p)[:, :in_features].to(dtype)
