"""SEFP reference codec in numpy (torch-free; the runtime uses it to switch precision).

Layout (DESIGN.md §3): a weight ``W[out, in]`` is cut into groups of G along ``in``; the last
group is zero-padded. Per group, ``E = floor(log2 max|w|)`` (int8; ``ZERO_GROUP_EXPONENT`` for
an all-zero group). The stored 8-bit code is the int8 value ``m8 = sign · M8`` with
``M8 ∈ [0, 127]``. A derived precision b is an integer code ``c`` and a step:
``w_b = c · Δ8 · 2^(8 - b - x)`` where x is the rounding's ``extra_code_bits`` (1 for midpoint,
whose codes are odd multiples of half a step) and Δ8 = 2^(E-6) (``sefp``) or an fp16 scale per
group (``ssfp``, E replaced by ``fp16(max|w|/127)``). Every product here is exact in fp32. The
derivation of c is the format table's (``fmt.derive``), written once for every backend.

:mod:`otaro.formats.torch_ref` is the bit-exact torch twin; tests hold them together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from otaro.errors import FormatError
from otaro.formats.table import TOP_BITS, ZERO_GROUP_EXPONENT, SEFPFormat

# Groups whose largest magnitude is below the smallest fp32 normal are flushed to zero: their
# exponent would not fit int8, and the error (< 2^-126) is far below any precision we store.
MIN_NORMAL = np.float32(2.0**-126)
_TOP_MAX = 2 ** (TOP_BITS - 1) - 1  # 127


@dataclass(frozen=True)
class SEFPTensor:
    """One encoded linear weight: int8 mantissas [out, in_padded] and the per-group shared value
    [out, groups]: int8 exponents (``pow2``) or float16 scales (``fp16``, the ssfp rows)."""

    mantissa: np.ndarray
    shared: np.ndarray
    in_features: int
    fmt: SEFPFormat

    @property
    def out_features(self) -> int:
        return self.mantissa.shape[0]

    @property
    def exponent(self) -> np.ndarray:
        if self.fmt.scale != "pow2":
            raise FormatError(f"{self.fmt.name} stores fp16 scales, not exponents")
        return self.shared


class NumpyOps:
    """The integer operations a derivation (otaro.formats.table) is written against."""

    c = staticmethod(lambda v: np.int32(v))
    add = staticmethod(np.add)
    mul = staticmethod(np.multiply)
    floordiv = staticmethod(np.floor_divide)
    mod = staticmethod(np.mod)
    minimum = staticmethod(np.minimum)


def check_finite(w: np.ndarray, name: str) -> None:
    if not np.isfinite(w).all():
        n_nan = int(np.isnan(w).sum())
        n_inf = int(np.isinf(w).sum())
        raise FormatError(f"tensor {name!r} has non-finite values ({n_nan} NaN, {n_inf} Inf); cannot quantize it")


def pad_groups(w: np.ndarray, group_size: int) -> np.ndarray:
    pad = (-w.shape[1]) % group_size
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return w


def floor_log2(amax: np.ndarray) -> np.ndarray:
    """Exact floor(log2(x)) for x > 0 via frexp (log2 can round up just below a power of two)."""
    _, e = np.frexp(amax)
    return e.astype(np.int32) - 1


def fp16_scale(amax: np.ndarray, name: str = "weight") -> np.ndarray:
    """ssfp's Δ8 = fp16(max|w| / 127) (0 for a group that is all zero or below fp16's range)."""
    if np.any(amax / 127 > np.finfo(np.float16).max):
        raise FormatError(f"tensor {name!r} has weights up to {float(amax.max()):.3g}, beyond fp16 scales")
    s = (amax.astype(np.float32) / np.float32(127)).astype(np.float16)
    return s


def encode(w: np.ndarray, fmt: SEFPFormat, name: str = "weight") -> SEFPTensor:
    """Quantize a 2-D float weight to the stored 8-bit SEFP code."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise FormatError(f"tensor {name!r} must be 2-D [out, in] to encode, got shape {w.shape}")
    check_finite(w, name)
    in_features = w.shape[1]
    G = fmt.group_size
    w32 = pad_groups(w.astype(np.float32), G)
    out, in_p = w32.shape
    g = w32.reshape(out, in_p // G, G)
    mag = np.abs(g)
    amax = mag.max(axis=-1)
    if fmt.scale == "pow2":
        live = amax >= MIN_NORMAL
        shared = np.where(live, floor_log2(np.where(live, amax, 1.0)), ZERO_GROUP_EXPONENT)
        # |w| / Δ_8 with Δ_8 = 2^(E-6): a power-of-two scaling, exact in fp32, result < 128.
        scaled = np.ldexp(mag, (TOP_BITS - 2 - shared)[..., None].astype(np.int32))
        shared = shared.astype(np.int8)
    else:
        shared = fp16_scale(amax, name)
        live = shared > 0
        # fp32 division, correctly rounded in numpy and torch alike (the twins agree).
        scaled = mag / np.where(live, shared.astype(np.float32), np.float32(1))[..., None]
    M8 = _TOP_ENCODERS[fmt.rounding_spec.encoder](scaled)
    M8 = np.where(live[..., None], M8, 0).astype(np.int16)
    m8 = np.where(np.signbit(g), -M8, M8).astype(np.int8).reshape(out, in_p)
    return SEFPTensor(m8, shared, in_features, fmt)


def _enc_floor(scaled):
    return np.minimum(np.floor(scaled), _TOP_MAX)


def _enc_rint(scaled):
    # np.rint is round-half-even, as torch.round is: the twins agree bit for bit.
    return np.minimum(np.rint(scaled), _TOP_MAX)


_TOP_ENCODERS = {"floor": _enc_floor, "rint": _enc_rint}


def derive_magnitudes(M8: np.ndarray, bits: int, fmt: SEFPFormat) -> np.ndarray:
    """b-bit magnitudes from stored magnitudes (int32), by the format table's derivation."""
    p = np.int32(2 ** (TOP_BITS - bits))
    return fmt.derive(NumpyOps, M8.astype(np.int32), p, np.int32(2 ** (bits - 1) - 1))


def derive_codes(mantissa: np.ndarray, bits: int, fmt: SEFPFormat) -> np.ndarray:
    """Signed integer codes at ``bits`` from the stored int8 mantissas (int16 result)."""
    fmt.check_bits(bits)
    m = mantissa.astype(np.int32)
    return (np.sign(m) * derive_magnitudes(np.abs(m), bits, fmt)).astype(np.int16)


def step_scale(shared: np.ndarray, bits: int, fmt: SEFPFormat) -> np.ndarray:
    """float32 step each group's codes at ``bits`` are multiplied by: Δ8 · 2^(8-b-x), exact
    (a power of two times an int8 exponent's power of two, or times an fp16 value)."""
    shift = TOP_BITS - bits - fmt.rounding_spec.extra_code_bits
    if fmt.scale == "pow2":
        return np.ldexp(np.float32(1.0), shared.astype(np.int32) - (TOP_BITS - 2) + shift).astype(np.float32)
    return np.ldexp(shared.astype(np.float32), shift).astype(np.float32)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, group_size: int, in_features: int) -> np.ndarray:
    out, in_p = codes.shape
    g = codes.reshape(out, in_p // group_size, group_size).astype(np.float32)
    w = (g * scale[..., None]).reshape(out, in_p)
    return np.ascontiguousarray(w[:, :in_features])


def decode(t: SEFPTensor, bits: int) -> np.ndarray:
    """Float32 weight at precision ``bits`` derived from the stored 8-bit code."""
    codes = derive_codes(t.mantissa, bits, t.fmt)
    return dequantize_codes(codes, step_scale(t.shared, bits, t.fmt), t.fmt.group_size, t.in_features)


def quantize(w: np.ndarray, fmt: SEFPFormat, bits: int, name: str = "weight") -> np.ndarray:
    """Encode then decode at ``bits``: what the device computes with."""
    return decode(encode(w, fmt, name), bits)
