"""Multi-bit code selection for SEFP/ssfp: one stored 8-bit code chosen for every precision.

An SEFP weight is stored once, as an int8 code c, and every precision b derives its value
``v_b(c) · Δ8`` from it (the format table's derivation). Rounding each weight to the nearest
8-bit code is best at b = 8 only. Here a code minimises the λ-weighted error over the target
bit-widths instead::

    cost(c) = Σ_b λ_b (u - v_b(c))² / Σ λ_b  =  u² - 2 u μ_c + q_c,     u = w / Δ8

with μ_c = Σ λ_b v_b(c) / Λ and q_c = Σ λ_b v_b(c)² / Λ. For fixed weights λ every candidate
is a line in u, so the best code is the lower envelope of 255 lines: computed once per
(format, λ), then every weight is one ``searchsorted`` — exact, not a search window.

Used two ways (both registered here):

* ``mbrtn`` — data free: each weight independently (error feedback off), with a per-group scale
  search (below) on the same objective.
* ``gptq`` on SEFP formats — the column quantizer of :mod:`otaro.methods.gptq`, with one
  error-feedback stream per target bit-width (see :class:`SEFPColumnQuantizer`), minimising
  Σ_b λ_b ‖(W - W_b) X‖² with each precision compensating its own error.

Scale search: ``pow2`` tries the group's exponent E and E - 1 (one step finer, saturating the
few weights beyond 127·Δ8); ``fp16`` tries Δ8 = α·max|w|/127 for α on a grid. Per group the
candidate with the lowest λ-weighted error wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from otaro.errors import OtaroError
from otaro.formats import SEFPFormat, TOP_BITS, ZERO_GROUP_EXPONENT
from otaro.formats import sefp as S
from otaro.formats import torch_ref as Q
from otaro.methods import Method, register_method
from otaro.methods.gptq import register_quantizer
from otaro.modules import SEFPLinear, convert

# Bit-widths of the format that are not targets still get this relative weight, so that among
# codes equally good for the targets the one closest at the other precisions wins (with targets
# {3, 4} many codes share their 3- and 4-bit values and b = 8 would otherwise be arbitrary).
UNTARGETED_WEIGHT = 1e-4
CODES = np.arange(-(2 ** (TOP_BITS - 1) - 1), 2 ** (TOP_BITS - 1), dtype=np.int8)  # -127..127
# α of Δ8 = α·max|w|/127: above 1 trades b = 8 range for less saturation at low b (the top
# b-bit level is (2^(b-1)-1)·2^(8-b) codes, below 127), below 1 clips outliers.
FP16_CLIP_GRID = (1.0, 1.08, 1.04, 0.96, 0.92, 0.88, 0.84, 0.80)


@dataclass(frozen=True)
class Envelope:
    """Lower envelope of the candidate lines: code ``codes[i]`` is best for u in
    [breaks[i-1], breaks[i])."""

    breaks: torch.Tensor  # float64 [k-1], increasing
    codes: torch.Tensor  # int8 [k]
    mu: torch.Tensor  # float64 [k]: λ-weighted mean derived value (Δ8 units)
    q: torch.Tensor  # float64 [k]: λ-weighted mean squared derived value


def derived_values(fmt: SEFPFormat) -> np.ndarray:
    """float64 [255, len(fmt.bits)]: the value of each stored code at each b, in units of Δ8."""
    cols = []
    for b in fmt.bits:
        shift = TOP_BITS - b - fmt.rounding_spec.extra_code_bits
        cols.append(S.derive_codes(CODES.reshape(1, -1), b, fmt)[0].astype(np.float64) * 2.0**shift)
    return np.stack(cols, axis=1)


def noise_weights(weights) -> dict[int, float]:
    """The λ_b a user gives weight each precision's error *relative to its own rounding noise*
    (Δ_b²/12 ∝ 4^(8-b)): λ = 1 everywhere asks every precision to give up the same fraction
    over its RTN error. Raw squared errors would let 2 bits (4096× the noise of 8 bits) decide
    every code and give up b = 8."""
    return {b: float(lam) * 4.0 ** (b - TOP_BITS) for b, lam in dict(weights).items()}


def full_weights(fmt: SEFPFormat, weights) -> np.ndarray:
    """Effective λ over every bit-width of the format (targets noise-normalised, the others
    UNTARGETED_WEIGHT of the smallest target weight)."""
    given = noise_weights(weights)
    floor = UNTARGETED_WEIGHT * min(given.values())
    return np.array([given.get(b, floor * 4.0 ** (b - TOP_BITS)) for b in fmt.bits], np.float64)


@lru_cache(maxsize=64)
def envelope(fmt: SEFPFormat, weights: tuple[tuple[int, float], ...]) -> Envelope:
    lam = full_weights(fmt, weights)
    V = derived_values(fmt)
    mu = V @ lam / lam.sum()
    q = (V**2) @ lam / lam.sum()
    # Lines f_c(u) = q_c - 2 μ_c u. Sorted by μ (slope decreasing); among equal μ only the
    # lowest q can ever be minimal, and among equal (μ, q) the code nearest... any: same cost.
    order = np.lexsort((q, mu))
    hull: list[int] = []
    for i in order:
        if hull and mu[hull[-1]] == mu[i]:
            continue  # same slope, higher (or equal) intercept: never strictly below
        while len(hull) >= 2:
            a, b_ = hull[-2], hull[-1]
            # b_ is useless if the new line overtakes a no later than b_ does
            x_ab = (q[b_] - q[a]) / (2 * (mu[b_] - mu[a]))
            x_ai = (q[i] - q[a]) / (2 * (mu[i] - mu[a]))
            if x_ai <= x_ab:
                hull.pop()
            else:
                break
        hull.append(i)
    h = np.array(hull)
    breaks = (q[h[1:]] - q[h[:-1]]) / (2 * (mu[h[1:]] - mu[h[:-1]]))
    return Envelope(torch.from_numpy(breaks), torch.from_numpy(CODES[h].copy()), torch.from_numpy(mu[h]),
                    torch.from_numpy(q[h]))


def select(u: torch.Tensor, env: Envelope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8, μ float64, cost float64) of the best code for each u (Δ8 units)."""
    u64 = u.to(torch.float64)
    i = torch.searchsorted(env.breaks.to(u.device), u64.contiguous(), right=True)
    mu, q = env.mu.to(u.device)[i], env.q.to(u.device)[i]
    return env.codes.to(u.device)[i], mu, u64 * u64 - 2 * u64 * mu + q


def _step8(shared: torch.Tensor, fmt: SEFPFormat) -> torch.Tensor:
    """Δ8 per group (float32), exactly as the codec decodes it."""
    return Q.sefp_step(shared, TOP_BITS, fmt) * float(2 ** fmt.rounding_spec.extra_code_bits)


def _live(shared: torch.Tensor, fmt: SEFPFormat) -> torch.Tensor:
    return shared > 0 if fmt.scale == "fp16" else shared.to(torch.int32) != ZERO_GROUP_EXPONENT


def scale_candidates(Wg: torch.Tensor, fmt: SEFPFormat, search: bool) -> list[torch.Tensor]:
    """Per-group shared values to try for grouped weights [out, groups, G]."""
    shared, _, _ = Q.sefp_shared(Wg.abs().amax(-1), fmt)
    if not search:
        return [shared]
    if fmt.scale == "pow2":
        live = _live(shared, fmt)
        finer = torch.where(live, shared.to(torch.int32) - 1, shared.to(torch.int32)).to(torch.int8)
        return [shared, finer]
    amax = Wg.abs().amax(-1).to(torch.float32)
    top = torch.finfo(torch.float16).max  # α > 1 must not overflow a scale that fits at α = 1
    return [(amax * a / 127).clamp(max=top).to(torch.float16) if a != 1.0 else shared for a in FP16_CLIP_GRID]


def choose_codes(Wg: torch.Tensor, fmt: SEFPFormat, env: Envelope, search: bool):
    """(codes int8 [out, groups, G], shared [out, groups]) minimising the multi-bit error of
    grouped weights, each weight on its own (no error feedback)."""
    best_cost = best_codes = best_shared = None
    for shared in scale_candidates(Wg, fmt, search):
        live = _live(shared, fmt)
        d8 = torch.where(live, _step8(shared, fmt), torch.ones_like(shared, dtype=torch.float32)).unsqueeze(-1)
        codes, _, cost = select(Wg / d8, env)
        cost = (cost * (d8.to(torch.float64) ** 2)).sum(-1)
        codes = torch.where(live.unsqueeze(-1), codes, torch.zeros_like(codes))
        cost = torch.where(live, cost, torch.zeros_like(cost))
        if best_cost is None:
            best_cost, best_codes, best_shared = cost, codes, shared
        else:
            better = cost < best_cost
            best_cost = torch.where(better, cost, best_cost)
            best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
            best_shared = torch.where(better, shared, best_shared)
    return best_codes, best_shared


def target_weights(fmt: SEFPFormat, config) -> tuple[tuple[int, float], ...]:
    bits = tuple(getattr(config, "bits", ()) or ())
    return bits or tuple((b, 1.0) for b in fmt.bits)


def scale_search_enabled(config) -> bool:
    return bool(getattr(config, "scale_search", True))


# --------------------------------------------------------------------------- GPTQ quantizer


class SEFPColumnQuantizer:
    """GPTQ's column quantizer for SEFP rows: one error-feedback stream per target bit-width.

    The solver is handed the weight tiled once per target (``expand``), so every precision b
    keeps its *own* compensated copy W_b of the columns not yet quantized (GPTQ's update is
    row-wise, so stacked rows are independent streams under the same H). At column j the one
    stored code is chosen against all of them::

        c = argmin_c Σ_b λ_b (w_b,j / Δ8 - v_b(c))²        (λ noise-normalised, see noise_weights)

    and each stream is fed back its own error w_b,j - v_b(c)·Δ8. With a single shared stream
    (feeding back the λ-mean) a compensation sized for the 4-bit error ruins 8 bits and vice
    versa (tests/test_multibit.py holds every target below RTN on a correlated problem).
    """

    def __init__(self, fmt: SEFPFormat, config=None):
        self.fmt = fmt
        self.group_size = fmt.group_size
        targets = target_weights(fmt, config)
        self.env = envelope(fmt, targets)  # the per-group scale search uses the data-free objective
        self.search = scale_search_enabled(config)
        lam = full_weights(fmt, targets)
        V = torch.from_numpy(derived_values(fmt))  # [255, len(fmt.bits)]
        self.targets = [b for b, _ in targets]
        idx = [fmt.bits.index(b) for b in self.targets]
        self.streams = len(idx)
        # Untargeted bit-widths keep their tiny tie-break weight, measured on the λ-mean stream.
        self._lam = torch.from_numpy(lam)
        self._idx = idx
        self._V = V
        self._mix = (self._lam[idx] / self._lam[idx].sum()).to(torch.float32)
        self._lam32, self._V32 = self._lam.to(torch.float32), V.to(torch.float32)
        self._q32 = (V * V) @ self._lam  # Σ λ_b v_b(c)² per candidate
        self._q32 = self._q32.to(torch.float32)
        self._codes = torch.from_numpy(CODES.copy())

    def expand(self, W: torch.Tensor) -> torch.Tensor:
        """The solver's input: one copy of W per target bit-width, stacked along rows."""
        return W.repeat(self.streams, 1)

    def _mean(self, X: torch.Tensor) -> torch.Tensor:
        S = self.streams
        return (X.reshape(S, -1, *X.shape[1:]) * self._mix.to(X).view(S, *([1] * X.dim()))).sum(0)

    def prepare(self, W: torch.Tensor, static_groups: bool) -> None:
        self.out = W.shape[0] // self.streams
        W = W[: self.out]  # every stream starts as the same W
        n_in = W.shape[1]
        G = self.group_size
        in_p = -(-n_in // G) * G
        self.in_features = n_in
        self.mantissa = torch.zeros(self.out, in_p, dtype=torch.int8, device=W.device)
        dtype = torch.int8 if self.fmt.scale == "pow2" else torch.float16
        self.shared = torch.zeros(self.out, in_p // G, dtype=dtype, device=W.device)
        if static_groups:
            Wp = Q.pad_groups(W.to(torch.float32), G).reshape(self.out, in_p // G, G)
            _, self.shared = choose_codes(Wp, self.fmt, self.env, self.search)
            self._refresh()

    def start_group(self, g: int, Wg: torch.Tensor) -> None:
        Wm = self._mean(Wg.to(torch.float32))
        padded = Q.pad_groups(Wm, self.group_size).reshape(self.out, 1, self.group_size)
        _, shared = choose_codes(padded, self.fmt, self.env, self.search)
        self.shared[:, g] = shared[:, 0]
        self._refresh()

    def _refresh(self):
        self._live = _live(self.shared, self.fmt)
        self._d8 = _step8(self.shared, self.fmt)

    def quantize_column(self, j: int, w: torch.Tensor) -> torch.Tensor:
        g = j // self.group_size
        live = self._live[:, g]
        d8 = torch.where(live, self._d8[:, g], torch.ones_like(self._d8[:, g]))
        # float32 scoring: |u| <= ~130 and 7 terms, so the score keeps ~1e-4 absolute accuracy,
        # far below the gap between distinct candidates that matter; 2-3x faster than float64.
        U = w.reshape(self.streams, self.out) / d8  # [S, out], Δ8 units
        lam, V, VV = self._lam32.to(w.device), self._V32.to(w.device), self._q32.to(w.device)
        # Targets see their own stream; the other bit-widths the λ-mean of the streams.
        mean = (U * self._mix.to(U).unsqueeze(1)).sum(0)
        Ufull = mean.unsqueeze(0).expand(len(self.fmt.bits), -1).clone()
        Ufull[self._idx] = U
        # Σ_b λ_b (u_b - v_b(c))² up to a constant: -2 Σ λ_b u_b v_b(c) + Σ λ_b v_b(c)²
        score = torch.addmm(VV, Ufull.T * lam, V.T, alpha=-2)  # [out, 255]
        best = score.argmin(1)
        codes = torch.where(live, self._codes.to(w.device)[best], torch.zeros_like(best, dtype=torch.int8))
        self.mantissa[:, j] = codes
        vals = V[best][:, self._idx].T * d8  # [S, out]: each stream's value
        return torch.where(live, vals, torch.zeros_like(vals)).reshape(-1)

    def build(self, linear: torch.nn.Linear) -> torch.nn.Module:
        return SEFPLinear.from_codes(linear, self.fmt, self.mantissa, self.shared)


register_quantizer("sefp", SEFPColumnQuantizer)


# --------------------------------------------------------------------------- mbrtn


def encode_multibit(w: torch.Tensor, fmt: SEFPFormat, weights, search: bool = True, name: str = "weight"):
    """(mantissa int8 [out, in_p], shared) of a 2-D weight by per-weight multi-bit selection."""
    Q.check_finite(w, name)
    G = fmt.group_size
    wp = Q.pad_groups(w.detach().to(torch.float32), G)
    out, in_p = wp.shape
    codes, shared = choose_codes(wp.reshape(out, in_p // G, G), fmt, envelope(fmt, tuple(weights)), search)
    return codes.reshape(out, in_p), shared


def run_mbrtn(model, fmt, config, calibration=None, progress=None):
    if fmt.family != "sefp":
        raise OtaroError(f"mbrtn selects SEFP codes; {fmt.name} is a {fmt.family} format (use rtn or gptq)")
    weights = target_weights(fmt, config)
    search = scale_search_enabled(config)

    def factory(name, linear):
        m8, shared = encode_multibit(linear.weight, fmt, weights, search, name)
        return SEFPLinear.from_codes(linear, fmt, m8, shared)

    return convert(model, fmt, packed=True, layer_factory=factory, progress=progress)


register_method(
    Method(
        "mbrtn",
        "multi-bit RTN: each stored SEFP code minimises the λ-weighted error over the target "
        "bit-widths (--bits), with a per-group scale search; no calibration",
        families=("sefp",),
        needs_calibration=False,
        run=run_mbrtn,
        target_bits=True,
    )
)
