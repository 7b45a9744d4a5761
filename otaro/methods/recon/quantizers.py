"""Learnable fake quantizers of block reconstruction (SignRound, LSI), one per format family.

A fake quantizer turns a float weight ``W`` [out, in] into the weight the packed layer will
compute with, *bit for bit*, while the backward pass sees a straight-through proxy:

* **int** (``IntFormat``, sym/asym per group; SignRound, Cheng et al. 2023)::

      s  = fp16(α·max(W) − β·min(W)) / qmax      asym (range widened to contain 0, as RTN)
      s  = fp16(α·max|W|) / qmax                 sym (β unused)
      zp = clamp(round(−β·min(W) / s), 0, qmax)
      W̃  = (clamp(round(W/s + V) + zp, qmin, qmax) − zp) · s

* **SEFP** (``SEFPFormat``): V acts on the stored 8-bit *magnitude* in units of its LSB Δ8, the
  sign of a weight never changes, and every derived precision b comes from that one code by
  the format's own derivation (``torch_ref.sefp_derive_codes``)::

      M   = clamp(enc(|W|/Δ8 + V), 0, 127)       enc: the row's encoder (rint or floor)
      W̃_b = sign(W) · derive_b(M) · step_b

  Clipping is a per-group factor α on the group's max |w| *before* the shared scale is made
  from it (the format's own rule), so the result is always a valid stored scale: ``pow2`` rows
  get floor(log2(α·max|w|)) — with α ∈ [0.5, 1] that is E or E − 1, a discrete choice learned
  through a straight-through gradient (auto-round's MX path does the same); ``fp16`` rows get
  fp16(α·max|w| / 127) with α up to the largest factor of mbrtn's clipping grid (above 1 trades
  8-bit range for less saturation at low b).

With V = 0 and α = β = 1 both give RTN's codes, scales and zero points exactly (tests check it),
so reconstruction starts from RTN and ``build`` writes the same layer classes RTN writes.

Gradients: rounding, the fp16 scale, the exponent choice and the derivation are straight-through
(``ValueOf``: the forward value is the exact one, the gradient flows to a smooth proxy); the
clamps keep their zero gradient outside the range (SignRound's behaviour). For SEFP the proxy of
each b saturates where that b saturates (the derived value of the top code), so clipping sees
the low-precision saturation it can reduce.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from otaro.errors import OtaroError
from otaro.formats import TOP_BITS, ZERO_GROUP_EXPONENT, IntFormat, SEFPFormat
from otaro.formats import torch_ref as Q
from otaro.methods.sefp_quantizer import FP16_CLIP_GRID

# Lowest clipping factor. SignSGD with lr = 1/iters and linear decay moves a factor by at most
# 0.5 from its init 1 anyway (research notes §2a); the clamp keeps that for any --recon-lr and
# keeps every scale positive. For pow2 SEFP it limits the choice to E or E - 1.
CLIP_MIN = 0.5
# Rounding offsets stay in SignRound's [-0.5, 0.5]: a weight may round down or up, nothing
# more. The paper's defaults never reach the bound (lr·iters/2 = 0.5); a larger --recon-lr would
# otherwise let V move a weight by several steps (the notes' suspected MB-3 divergence).
V_MAX = 0.5
_TOP_MAX = 2 ** (TOP_BITS - 1) - 1  # 127, the largest stored SEFP magnitude


class ValueOf(torch.autograd.Function):
    """Forward: ``exact`` unchanged; backward: the gradient goes to ``proxy`` as it is.

    (``proxy + (exact - proxy).detach()`` is not bit-exact: the two roundings can move the value
    by an ulp, and the fake-quant must equal what the packed layer computes.)"""

    @staticmethod
    def forward(ctx, proxy, exact):
        return exact.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuant(nn.Module):
    """Learnable parameters of one weight's quantization: V (optional) and clipping factors."""

    clip_max = 1.0

    def __init__(self, fmt, shape: tuple[int, int], rounding: bool, device=None):
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = shape
        G = fmt.group_size
        self.in_padded = -(-self.in_features // G) * G
        groups = self.in_padded // G
        # V has the shape of W (the padding columns hold zero weights and never move).
        self.V = nn.Parameter(torch.zeros(shape, device=device)) if rounding else None
        self.alpha = nn.Parameter(torch.ones(self.out_features, groups, device=device))

    def start_clip(self, W: torch.Tensor, targets, search: bool) -> None:
        """Set the clipping's starting point from ``W`` (default: none, α = β = 1)."""

    def round_params(self) -> list[nn.Parameter]:
        return [] if self.V is None else [self.V]

    def clip_params(self) -> list[nn.Parameter]:
        return [self.alpha]

    @torch.no_grad()
    def project_(self) -> None:
        """Back into the allowed ranges after an optimiser step."""
        self.alpha.clamp_(CLIP_MIN, self.clip_max)
        if self.V is not None:
            self.V.clamp_(-V_MAX, V_MAX)

    def _grouped(self, W: torch.Tensor) -> torch.Tensor:
        W = Q.pad_groups(W.to(torch.float32), self.fmt.group_size)
        return W.reshape(self.out_features, -1, self.fmt.group_size)

    def _offsets(self) -> torch.Tensor | None:
        if self.V is None:
            return None
        return F.pad(self.V, (0, self.in_padded - self.in_features)).reshape(self.out_features, -1,
                                                                              self.fmt.group_size)

    def _ungroup(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(self.out_features, self.in_padded)[:, : self.in_features]


class IntFakeQuant(FakeQuant):
    """SignRound on an integer row: V, α and (asym) β per group."""

    def __init__(self, fmt: IntFormat, shape, rounding: bool, device=None):
        super().__init__(fmt, shape, rounding, device)
        self.beta = None if fmt.symmetric else nn.Parameter(torch.ones_like(self.alpha))

    def clip_params(self) -> list[nn.Parameter]:
        return [self.alpha] + ([] if self.beta is None else [self.beta])

    @torch.no_grad()
    def project_(self) -> None:
        super().project_()
        if self.beta is not None:
            self.beta.clamp_(CLIP_MIN, self.clip_max)

    def _parts(self, W: torch.Tensor):
        """(grouped W, scale, zero point, codes): scale/zero/codes exact values with gradient proxies."""
        fmt = self.fmt
        g = self._grouped(W)
        if fmt.symmetric:
            s_cont = self.alpha * g.abs().amax(-1) / fmt.qmax
        else:
            lo = torch.clamp(g.amin(-1), max=0.0)
            hi = torch.clamp(g.amax(-1), min=0.0)
            s_cont = (self.alpha * hi - self.beta * lo) / fmt.qmax
        # As torch_ref.int_rtn_params: fp16-representable scales (deployment stores fp16), 1 for
        # a group whose scale is zero (its codes are all the zero point).
        s_exact = s_cont.detach().to(torch.float16).to(torch.float32)
        s_exact = torch.where(s_exact > 0, s_exact, torch.ones_like(s_exact))
        s = ValueOf.apply(s_cont, s_exact)
        if fmt.symmetric:
            zp = torch.zeros_like(s)
        else:
            z_cont = -self.beta * lo / s
            zp = ValueOf.apply(z_cont, torch.clamp(torch.round(z_cont.detach()), 0, fmt.qmax))
        x = g / s.unsqueeze(-1)
        V = self._offsets()
        if V is not None:
            x = x + V
        zq = zp.unsqueeze(-1)
        q_exact = torch.clamp(torch.round(x.detach()) + zq.detach(), fmt.qmin, fmt.qmax)
        q = ValueOf.apply(torch.clamp(x + zq, fmt.qmin, fmt.qmax), q_exact)
        return g, s, zp, q

    def forward(self, W: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        _, s, zp, q = self._parts(W)
        return self._ungroup((q - zp.unsqueeze(-1)) * s.unsqueeze(-1))

    @torch.no_grad()
    def build(self, linear: nn.Linear, W: torch.Tensor) -> nn.Module:
        from otaro.modules import IntLinear

        _, s, zp, q = self._parts(W)
        codes = q.reshape(self.out_features, self.in_padded).to(torch.int16)
        return IntLinear.from_codes(linear, self.fmt, codes, s, zp.to(torch.int16))


class SEFPFakeQuant(FakeQuant):
    """SignRound on an SEFP row: V on the stored 8-bit magnitude, α on the group's max |w|."""

    def __init__(self, fmt: SEFPFormat, shape, rounding: bool, device=None):
        super().__init__(fmt, shape, rounding, device)
        self.clip_max = 1.0 if fmt.scale == "pow2" else max(FP16_CLIP_GRID)
        if fmt.scale == "pow2":
            # Not learned (see clip_params); set once by start_clip from the scale search.
            self.alpha.requires_grad_(False)
        x = fmt.rounding_spec.extra_code_bits
        top = torch.tensor([[_TOP_MAX]], dtype=torch.int8)
        # The value of the largest stored code at each b, in Δ8 units: where b saturates.
        self._saturation = {b: float(Q.sefp_derive_codes(top, b, fmt)[0, 0]) * 2.0 ** (TOP_BITS - b - x)
                            for b in fmt.bits}

    def clip_params(self) -> list[nn.Parameter]:
        # pow2: α only picks E or E - 1, a jump the straight-through gradient cannot see. Learned,
        # a group whose max sits just above 2^E flipped to E - 1 at the first steps, halving Δ8
        # and saturating half its range: the multi-bit loss of a tiny llama rose 7x. The choice
        # is made once instead (start_clip); fp16 scales are continuous and learn α.
        return [] if self.fmt.scale == "pow2" else [self.alpha]

    @torch.no_grad()
    def start_clip(self, W: torch.Tensor, targets, search: bool) -> None:
        """pow2 rows with ``search``: each group starts at the exponent (E or E - 1) that mbrtn's
        and gptq's scale search picks on the λ-weighted weight error (α = 1 or 1/2: exact)."""
        if self.fmt.scale != "pow2" or not search:
            return
        from otaro.methods.sefp_quantizer import choose_codes, envelope

        g = self._grouped(W.detach())
        _, shared = choose_codes(g, self.fmt, envelope(self.fmt, tuple(targets)), True)
        E, _, _ = Q.sefp_shared(g.abs().amax(-1), self.fmt)
        self.alpha.copy_(torch.where(shared.to(torch.int32) < E.to(torch.int32), 0.5, 1.0))

    def _shared(self, amax_scaled: torch.Tensor):
        """(shared value, live mask, Δ8) for α·max|w| by the format's own rule (no gradient)."""
        fmt = self.fmt
        if fmt.scale == "fp16":  # α > 1 must not overflow a scale that fits at α = 1
            amax_scaled = amax_scaled.clamp(max=_TOP_MAX * torch.finfo(torch.float16).max)
        shared, _, _ = Q.sefp_shared(amax_scaled, fmt)
        live = shared > 0 if fmt.scale == "fp16" else shared.to(torch.int32) != ZERO_GROUP_EXPONENT
        d8 = Q.sefp_step(shared, TOP_BITS, fmt) * float(2 ** fmt.rounding_spec.extra_code_bits)
        return shared, live, torch.where(live, d8, torch.ones_like(d8))

    def _parts(self, W: torch.Tensor):
        fmt = self.fmt
        g = self._grouped(W)
        mag = g.abs()
        scaled_max = self.alpha * mag.amax(-1)
        with torch.no_grad():
            shared, live, d8_exact = self._shared(scaled_max)
        # Straight-through scale: d log Δ8 / d log(α·max|w|) = 1, as a continuous scale would have.
        ref = torch.where(live, scaled_max, torch.ones_like(scaled_max))
        d8 = ValueOf.apply(d8_exact * ref / ref.detach(), d8_exact).unsqueeze(-1)
        u = ValueOf.apply(mag / d8, Q.sefp_scaled(mag.detach(), shared, fmt))
        V = self._offsets()
        m = u if V is None else u + V
        with torch.no_grad():
            enc = torch.round if fmt.rounding_spec.encoder == "rint" else torch.floor
            M = torch.clamp(enc(m), 0, _TOP_MAX)
            M = torch.where(live.unsqueeze(-1), M, torch.zeros_like(M)).to(torch.int16)
            m8 = torch.where(torch.signbit(g), -M, M).to(torch.int8)
        return g, u, d8, live, shared, m8

    def _values(self, M: torch.Tensor, bits: int) -> torch.Tensor:
        """Derived value at ``bits`` of stored magnitudes ``M`` (0..127), in Δ8 units."""
        x = self.fmt.rounding_spec.extra_code_bits
        codes = Q.sefp_derive_codes(M.to(torch.int8).reshape(self.out_features, self.in_padded), bits, self.fmt)
        return codes.reshape(M.shape).to(torch.float32) * 2.0 ** (TOP_BITS - bits - x)

    def _secant(self, u: torch.Tensor, bits: int) -> torch.Tensor:
        """d(value at b)/dV as V can actually move it: the secant of the b-bit value between the
        two codes V ∈ [-V_MAX, V_MAX] can reach. 1 at b = 8; at a derived b it is the b-bit
        step for the few weights whose reachable codes straddle a b-bit boundary and 0 for the
        rest. (Plain STE, slope 1 everywhere, tells V to chase low-b errors it cannot change
        and costs the 8-bit code: the multi-bit objective then *rose* under SignSGD.)"""
        enc = torch.round if self.fmt.rounding_spec.encoder == "rint" else torch.floor
        lo = torch.clamp(enc(u - V_MAX), 0, _TOP_MAX)
        hi = torch.clamp(enc(u + V_MAX), 0, _TOP_MAX)
        rise = self._values(hi, bits) - self._values(lo, bits)
        return torch.where(hi > lo, rise / torch.clamp(hi - lo, min=1), torch.zeros_like(rise))

    def forward(self, W: torch.Tensor, bits: int) -> torch.Tensor:
        g, u, d8, live, shared, m8 = self._parts(W)
        M = m8.to(torch.int16)
        exact = self._values(M.abs(), bits) * torch.sign(M).to(torch.float32)  # Δ8 units, exact
        # Gradient proxy in Δ8 units: through |W| and the scale the expected slope 1 (saturating
        # where b saturates); through V the slope V really has at this b (_secant). Δ8 stays
        # outside, so d/dΔ8 is the rounding residual (value − u), as in SignRound and LSQ.
        value = torch.clamp(u, 0, self._saturation[bits])
        if self.V is not None:
            with torch.no_grad():
                slope = self._secant(u.detach(), bits)
            value = value + slope * self._offsets()
        proxy = torch.sign(g.detach()) * value * live.unsqueeze(-1)
        return self._ungroup(ValueOf.apply(proxy, exact) * d8)

    @torch.no_grad()
    def build(self, linear: nn.Linear, W: torch.Tensor) -> nn.Module:
        from otaro.modules import SEFPLinear

        *_, shared, m8 = self._parts(W)
        return SEFPLinear.from_codes(linear, self.fmt, m8.reshape(self.out_features, self.in_padded), shared)


FAKE_QUANTS: dict[str, type[FakeQuant]] = {"int": IntFakeQuant, "sefp": SEFPFakeQuant}


def make_fake_quant(fmt, shape: tuple[int, int], rounding: bool, device=None) -> FakeQuant:
    try:
        cls = FAKE_QUANTS[fmt.family]
    except KeyError:
        raise OtaroError(f"block reconstruction has no fake quantizer for {fmt.family} formats ({fmt.name}); "
                         f"it can produce: {', '.join(sorted(FAKE_QUANTS))}") from None
    return cls(fmt, shape, rounding, device)
