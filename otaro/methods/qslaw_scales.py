"""QSLAW's learnable group-wise scale factors on fixed codes, and their fold into the layout.

``ScaledLayer`` wraps a packed ``IntLinear`` or ``SEFPLinear`` and holds one factor f per
(output row, group), initialised to 1. Its weight at precision b is::

    int, ssfp:  W_b = base_b · r16(scale · f)            (per group, over its G weights)
    sefp pow2:  W_b = base_b · 2^(E + round(log2 f))

with ``base_b`` the layer's own fixed integer codes (int: q − zero; SEFP: the code derived at b,
times the power of two of the step at b) and ``r16`` the rounding to fp16 that every stored
scale goes through. Both roundings are straight-through in the backward, so f keeps learning
between the values it can take. The forward therefore uses exactly the scale that ``fold``
writes: the folded packed layer computes bit for bit what the last training forward computed,
and the codes are never touched (only the factors get gradients).

Pow2 SEFP rows store an int8 exponent per group: a factor that is not a power of two has no slot
there, so the factor is rounded to one (the group exponent moves by whole steps, a learned
version of the "store E-1" clipping choice). That is a much coarser knob than ssfp's fp16 scale
(docs/DESIGN.md §7.21): the ssfp row of the same group size and rounding is the one to use.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from otaro.errors import FormatError, OtaroError
from otaro.formats import ZERO_GROUP_EXPONENT, IntFormat, SEFPFormat
from otaro.formats import torch_ref as Q
from otaro.modules import IntLinear, SEFPLinear, _StraightThrough

# Factors are kept in this range after every step: a scale must stay positive (every layout
# stores positive scales; a factor of 0 would erase a group) and finite in fp16.
FACTOR_RANGE = (1e-2, 1e2)
_FP16_TINY = 2.0**-24  # the smallest positive fp16 (subnormal): a live group's scale never rounds to 0
_FP16_MAX = float(torch.finfo(torch.float16).max)
_EXPONENT_RANGE = (-127, 127)  # int8 without the reserved all-zero-group exponent (-128)


def check_scale_kind(fmt) -> None:
    """Refuse formats with no group scale to learn (float rows)."""
    if not isinstance(fmt, (SEFPFormat, IntFormat)):
        raise FormatError(f"qslaw needs an int or SEFP format (got {fmt.name})")


def is_pow2(fmt) -> bool:
    return isinstance(fmt, SEFPFormat) and fmt.scale == "pow2"


# Forward: the snapped value given; backward: the gradient passes to the raw one (the same
# straight-through Function SEFPLinear uses).
_Snap = _StraightThrough


def folded_scale(scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """int/ssfp: the fp16-representable float32 scale a factor makes (dead ssfp groups, scale 0,
    stay 0; a live group's never rounds to 0)."""
    raw = scale.to(torch.float32) * factor
    s = raw.detach().to(torch.float16).to(torch.float32)
    s = torch.where(scale > 0, s.clamp(min=_FP16_TINY), s)
    return _Snap.apply(raw, s)


def exponent_shift(exponent: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """pow2: int32 whole steps round(log2 f) per group, kept inside the int8 exponent range
    (0 for all-zero groups)."""
    E = exponent.to(torch.int32)
    k = torch.round(torch.log2(factor.detach())).to(torch.int32)
    k = torch.clamp(E + k, *_EXPONENT_RANGE) - E
    return torch.where(E == ZERO_GROUP_EXPONENT, torch.zeros_like(k), k)


class ScaledLayer(nn.Module):
    """A packed layer with a trainable factor per group scale (see the module doc)."""

    packed = True

    def __init__(self, inner: nn.Module):
        super().__init__()
        if not isinstance(inner, (IntLinear, SEFPLinear)) or not getattr(inner, "packed", False):
            raise OtaroError(f"qslaw scales packed int/SEFP layers, not {type(inner).__name__}")
        check_scale_kind(inner.fmt)
        self.inner = inner
        self.fmt = inner.fmt
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.factor = nn.Parameter(torch.ones(self._scale.shape, dtype=torch.float32, device=self._scale.device))

    # -- what set_precision / get_precision expect of a quantized layer
    @property
    def bits(self):
        return self.inner.bits

    def set_bits(self, bits) -> None:
        self.inner.set_bits(bits)

    @property
    def bias(self):
        return self.inner.bias

    @property
    def _scale(self) -> torch.Tensor:
        return self.inner.scales if isinstance(self.inner, IntLinear) else self.inner.shared

    def _base(self, bits: int) -> torch.Tensor:
        """float32 [out, groups, G]: the fixed integer codes, in units of the group scale."""
        inner, G = self.inner, self.fmt.group_size
        if isinstance(inner, IntLinear):
            codes = inner.qweight.to(torch.int16) - inner.zeros.to(torch.int16).repeat_interleave(G, dim=1)
            base = codes.to(torch.float32)
        else:
            base = Q.sefp_derive_codes(inner.mantissa, bits, self.fmt).to(torch.float32)
        return base.reshape(self.out_features, -1, G)

    def _step(self, bits: int) -> torch.Tensor:
        """float32 [out, groups]: the learned step (differentiable in the factors)."""
        if is_pow2(self.fmt):
            k = exponent_shift(self._scale, self.factor)
            mult = _Snap.apply(self.factor, torch.ldexp(torch.ones_like(self.factor), k.to(torch.float32)))
            return Q.sefp_step(self._scale, bits, self.fmt) * mult  # powers of two: exact
        scale = folded_scale(self._scale, self.factor)
        if isinstance(self.inner, SEFPLinear):
            return Q.sefp_step(scale, bits, self.fmt)  # fp16 kind: scale · 2^(8-b-x), exact
        return scale

    def weight_at(self, bits: int | None = None) -> torch.Tensor:
        bits = self.inner.bits if bits is None else bits
        w = (self._base(bits) * self._step(bits).unsqueeze(-1)).reshape(self.out_features, -1)
        return w[:, : self.in_features].to(self.inner.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.inner.bias
        return F.linear(x, self.weight_at().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.factor.clamp_(*FACTOR_RANGE)

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """The stored per-group value the factors make (checked to fit); nothing is written."""
        if is_pow2(self.fmt):
            return (self._scale.to(torch.int32) + exponent_shift(self._scale, self.factor)).to(torch.int8)
        s = folded_scale(self._scale, self.factor)
        if not bool(torch.isfinite(s).all()) or float(s.max()) > _FP16_MAX:
            raise FormatError("a learned group scale overflows fp16; lower --qslaw-lr")
        return s

    @torch.no_grad()
    def fold(self, value: torch.Tensor | None = None) -> nn.Module:
        """The inner layer with the factors folded into its stored scale (in place); returns it."""
        value = self.folded() if value is None else value
        self._scale.copy_(value.to(self._scale.dtype))
        self.inner._cache = None  # the cached dequantized weight used the old scale
        return self.inner

    def extra_repr(self) -> str:
        return f"factors {tuple(self.factor.shape)}"


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install(model: nn.Module, names) -> dict[str, ScaledLayer]:
    """Wrap the named packed layers; returns name -> wrapper."""
    wrappers = {}
    for name in names:
        wrappers[name] = ScaledLayer(model.get_submodule(name))
        _set(model, name, wrappers[name])
    return wrappers


def uninstall(model: nn.Module, wrappers: dict[str, ScaledLayer], fold: bool = True) -> None:
    """Put the packed layers back, with the factors folded in (or dropped: ``fold=False``).
    Every folded value is checked before the first is written: a refusal changes nothing."""
    values = {name: w.folded() for name, w in wrappers.items()} if fold else {}
    for name, w in wrappers.items():
        _set(model, name, w.fold(values[name]) if fold else w.inner)
