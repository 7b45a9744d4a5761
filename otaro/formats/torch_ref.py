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


class TorchOps:
    """The integer operations of a derivation (otaro.formats.table) on int32 tensors."""

    c = staticmethod(lambda v: v)  # python ints broadcast
    add = staticmethod(torch.add)
    mul = staticmethod(torch.mul)
    floordiv = staticmethod(lambda a, b: torch.div(a, b, rounding_mode="floor"))
    mod = staticmethod(torch.remainder)
    minimum = staticmethod(lambda a, b: torch.clamp(a, max=b) if isinstance(b, int) else torch.minimum(a, b))


def sefp_shared(amax: torch.Tensor, fmt: SEFPFormat, name: str = "weight"):
    """(shared value per group, live mask, Δ8 as float32) from each group's max |w|."""
    if fmt.scale == "pow2":
        live = amax >= _MIN_NORMAL
        _, e = torch.frexp(torch.where(live, amax, torch.ones_like(amax)))
        E = torch.where(live, e.to(torch.int32) - 1, torch.full_like(e, ZERO_GROUP_EXPONENT, dtype=torch.int32))
        return E.to(torch.int8), live, None
    if bool((amax / 127 > torch.finfo(torch.float16).max).any()):
        raise FormatError(f"tensor {name!r} has weights up to {float(amax.max()):.3g}, beyond fp16 scales")
    s = (amax.to(torch.float32) / 127).to(torch.float16)
    live = s > 0
    return s, live, torch.where(live, s.to(torch.float32), torch.ones_like(amax))


def sefp_scaled(mag: torch.Tensor, shared: torch.Tensor, fmt: SEFPFormat) -> torch.Tensor:
    """|w| / Δ8 per weight ([out, groups, G] magnitudes, [out, groups] shared values)."""
    if fmt.scale == "fp16":
        live = shared > 0
        d = torch.where(live, shared.to(torch.float32), torch.ones_like(shared, dtype=torch.float32))
        return mag / d.unsqueeze(-1)
    # |w| / Δ_8 = |w| · 2^(6-E). torch.ldexp multiplies by pow(2, e) computed in fp32, which
    # overflows to inf for e >= 128 (groups with E <= -122); split the shift in two halves
    # (each |half| <= 66, a normal power of two). Both products are exact where it matters:
    # the first only rescales, and any rounding of tiny values stays far below one Δ_8 step.
    shift = (TOP_BITS - 2 - shared.to(torch.int32)).unsqueeze(-1)
    half = torch.div(shift, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(mag, half.to(torch.float32)), (shift - half).to(torch.float32))


_ENCODERS = {
    "rint": lambda x: torch.clamp(torch.round(x), max=_TOP_MAX),  # round-half-even, like np.rint
    "floor": lambda x: torch.clamp(torch.floor(x), max=_TOP_MAX),
}


def sefp_encode(w: torch.Tensor, fmt: SEFPFormat, name: str = "weight", check: bool = True):
    """(mantissa int8 [out, in_p], shared [out, groups]) of a 2-D weight; shared is the int8
    exponent (sefp) or the fp16 scale (ssfp)."""
    if w.dim() != 2:
        raise FormatError(f"tensor {name!r} must be 2-D [out, in] to encode, got shape {tuple(w.shape)}")
    if check:
        check_finite(w, name)
    G = fmt.group_size
    w32 = pad_groups(w.detach().to(torch.float32), G)
    out, in_p = w32.shape
    g = w32.reshape(out, in_p // G, G)
    mag = g.abs()
    shared, live, _ = sefp_shared(mag.amax(dim=-1), fmt, name)
    return sefp_encode_with(w32, shared, fmt, live), shared


def sefp_encode_with(w_padded: torch.Tensor, shared: torch.Tensor, fmt: SEFPFormat, live=None) -> torch.Tensor:
    """The stored int8 codes of a padded weight under given per-group shared values (a scale
    search picks them; weights beyond 127·Δ8 saturate)."""
    out, in_p = w_padded.shape
    G = fmt.group_size
    g = w_padded.reshape(out, in_p // G, G)
    if live is None:
        live = shared > 0 if fmt.scale == "fp16" else shared.to(torch.int32) != ZERO_GROUP_EXPONENT
    M8 = _ENCODERS[fmt.rounding_spec.encoder](sefp_scaled(g.abs(), shared, fmt))
    M8 = torch.where(live.unsqueeze(-1), M8, torch.zeros_like(M8)).to(torch.int16)
    return torch.where(torch.signbit(g), -M8, M8).to(torch.int8).reshape(out, in_p)


def sefp_derive_codes(mantissa: torch.Tensor, bits: int, fmt: SEFPFormat) -> torch.Tensor:
    fmt.check_bits(bits)
    m = mantissa.to(torch.int32)
    p = 2 ** (TOP_BITS - bits)
    Mb = fmt.derive(TorchOps, m.abs(), p, 2 ** (bits - 1) - 1)
    return (torch.sign(m) * Mb).to(torch.int16)


def sefp_step(shared: torch.Tensor, bits: int, fmt: SEFPFormat) -> torch.Tensor:
    """float32 step per group at ``bits``: Δ8 · 2^(8-b-x) (exact)."""
    shift = TOP_BITS - bits - fmt.rounding_spec.extra_code_bits
    if fmt.scale == "pow2":
        e = shared.to(torch.int32) - (TOP_BITS - 2) + shift
        return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.float32))
    return shared.to(torch.float32) * float(2.0**shift)


def sefp_dequantize(
    mantissa: torch.Tensor, shared: torch.Tensor, bits: int, fmt: SEFPFormat, in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    codes = sefp_derive_codes(mantissa, bits, fmt)
    out, in_p = codes.shape
    G = fmt.group_size
    g = codes.reshape(out, in_p // G, G).to(torch.float32) * sefp_step(shared, bits, fmt).unsqueeze(-1)
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
