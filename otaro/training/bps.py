"""Bit-width paths: which bit-width each fine-tuning step runs at.

A *path* is the sequence of bit-widths the once-for-all fine-tuning visits, one per step. The
trainer asks ``next_bits()`` before a step and reports the step's loss with ``observe()`` after
it. Paths are pure Python (``random.Random``, no torch) and fully resumable: ``state_dict()`` is
JSON-able and a scheduler that loads it continues the exact same path.

Registry ``PATHS`` (factory :func:`make_path`):

``bps``
    Exploitation-exploration bit-width path search (below).
``round-robin``
    Cycles through the bit-widths, lowest first (ablation baseline).
``random``
    A seeded uniform-random bit-width every step (ablation baseline).
``fixed``
    Always one bit-width (per-precision "model zoo" runs).

BPS -- our design [OURS]
------------------------
The OTARo paper (arXiv 2511.13147) names BPS ("iteratively updates the search path via a designed
scoring mechanism", balancing exploitation and exploration) but its score, exploration rule and
hyperparameters could not be recovered. What follows is *our* reconstruction; every knob is
exposed so that ablations (against ``round-robin`` and ``random``) decide whether it helps.

Statistics, per bit-width ``b`` (updated by ``observe(b, loss)``):

* ``n_b`` -- visits (observed steps at ``b``);
* ``E_b`` -- EMA of the training loss at ``b``: ``E_b <- ema * E_b + (1 - ema) * loss`` (the
  first observation initialises it);
* ``G_b`` (``b`` below the top precision ``T = max(bits)``) -- EMA of the *time-aligned gap*:
  every observation at ``b`` contributes the sample ``loss - E_T`` (the top's loss EMA at that
  moment), with the same ``ema``.

Score ``s_b`` (knob ``score``):

* ``"gap"`` (default): ``s_b = G_b`` -- how far ``b`` lags behind the top precision;
  ``s_T = 0``. Before the top has been observed (or for a bit-width with no gap sample yet) the
  fallback is ``E_b - E_T``.
* ``"loss"``: ``s_b = E_b``.

Scores are min-max normalised across the bit-widths that have one:
``S_b = (s_b - min s) / (max s - min s)`` in [0, 1]; all equal -> 0; no score yet -> 0.

Why the gap is time-aligned: with min-max normalisation the literal ``E_b - E_T`` is the loss
score shifted by a constant, i.e. *identical* to ``"loss"``. Sampling the gap at each visit
instead removes the common downward trend of the training loss: a bit-width that has not been
visited for a while does not look bad merely because its EMA dates from earlier, higher-loss
steps (under ``"loss"`` it does, which acts as extra exploration).

Path construction, in segments of ``segment_len`` steps built when the previous one is used up
(scores are frozen while a segment is built; ``v_b`` counts the slots already given to ``b`` in
the segment being built -- "virtual visits" -- and ``N = sum_b (n_b + v_b)``). Each slot, in
order of precedence:

1. **Top guard** -- if the last ``top_every - 1`` slots of the path (across segments) hold no
   top precision, the slot is ``T``: every window of ``top_every`` consecutive steps contains
   the top precision (default ``top_every = max(segment_len, 2)``), so it is never starved.
2. **Cold start** -- a bit-width never visited (``n_b = 0``) and not yet in this segment takes
   the slot: the top first (so the gap has its reference), then ascending. The first segment is
   therefore a round-robin over all bit-widths.
3. ``explore="ucb"`` (default): ``argmax_b S_b + ucb_c * sqrt(ln(N + 1) / (n_b + v_b + 1))``.
   ``explore="epsilon"``: with probability ``epsilon`` a uniform-random bit-width; otherwise
   ``argmax_b S_b``, ties going to the smallest ``n_b + v_b`` (the same virtual-visit
   penalty as UCB's bonus).

   With ``score="gap"`` the argmax of rules 3 runs over the bit-widths *below* the top (its
   score is 0 by definition, and early in training the lower bit-widths' gaps are negative
   because the top's EMA still remembers the first, high losses, so the top would win every
   argmax and the path would lock onto it); the top gets its slots from rule 1.

Remaining ties go to the lower bit-width. The only randomness is the ``epsilon`` draw (seeded
``random.Random(seed)``), so a seed fixes the path given the observed losses.

Multi-process training: every rank builds the scheduler with the same config and seed and must
``observe`` the loss *already reduced across ranks* (the same float everywhere); then every rank
computes the same scores and takes the same path without any extra communication.

Non-finite losses count as a visit but do not enter the EMAs (``describe()["skipped"]``).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from otaro.errors import OtaroError
from otaro.formats import check_bits, format_bits, parse_bits

EXPLORE_RULES = ("ucb", "epsilon")
SCORES = ("gap", "loss")
DEFAULT_EMA = 0.9


class PathConfigError(OtaroError, ValueError):
    """A bad bit-width path configuration or a state that does not belong to this path."""


# ---------------------------------------------------------------------------------------------
# validation helpers


def _bit_set(bits: str | int | Iterable[int]) -> tuple[int, ...]:
    """Sorted distinct bit-widths from ``"2-8"``, ``"2,3,8"``, ``4`` or an iterable of ints."""
    if isinstance(bits, (str, int)):
        return parse_bits(bits)
    try:
        items = list(bits)
    except TypeError:
        raise PathConfigError(f"bit-widths must be a list of integers or a spec like '2-8' (got {bits!r})") from None
    return tuple(sorted({check_bits(b) for b in items}))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PathConfigError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return value


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PathConfigError(f"{name} must be a finite number (got {value!r})")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PathConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# ---------------------------------------------------------------------------------------------
# common interface


class BitPath(ABC):
    """A bit-width path scheduler (see the module docstring).

    Subclasses set ``name``, ``knobs`` (keyword knobs :func:`make_path` passes on) and implement
    ``_build_segment``; the base class keeps the segment queue, history, visit counts and loss
    EMAs, and the JSON state.
    """

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()
    single_bit: ClassVar[bool] = False  # takes exactly one bit-width (``fixed``)

    def __init__(self, bits: str | int | Iterable[int], seed: int = 0, ema: float = DEFAULT_EMA):
        self.bits: tuple[int, ...] = _bit_set(bits)
        if not self.bits:
            raise PathConfigError("no bit-widths given")
        self.seed = _check_int("seed", seed, 0)
        self.ema = _check_real("ema", ema)
        if not 0 < self.ema < 1:
            raise PathConfigError(f"ema must be in (0, 1) (got {ema!r})")
        self._rng = random.Random(self.seed)
        self.visits: dict[int, int] = {b: 0 for b in self.bits}
        self.ema_loss: dict[int, float | None] = {b: None for b in self.bits}
        self.skipped = 0
        self.history: list[int] = []
        self._pending: list[int] = []

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_knobs(cls, bits, seed: int = 0, **knobs) -> BitPath:
        return cls(bits, seed=seed, **knobs)

    def config_dict(self) -> dict:
        """The configuration, JSON-able (lists, not tuples)."""
        return {"bits": list(self.bits), "seed": self.seed, "ema": self.ema}

    @property
    def top(self) -> int:
        return self.bits[-1]

    # -- the path -------------------------------------------------------------------------------

    def next_bits(self) -> int:
        """The bit-width of the next step (builds the next segment when the current one is used up)."""
        if not self._pending:
            self._pending = list(self._build_segment())
            if not self._pending:  # pragma: no cover - a subclass bug
                raise RuntimeError(f"{self.name} path built an empty segment")
        b = self._pending.pop(0)
        self.history.append(b)
        return b

    @abstractmethod
    def _build_segment(self) -> list[int]:
        """The next bit-widths of the path (at least one)."""

    def observe(self, bits: int, loss: float) -> None:
        """Record the loss of a step taken at ``bits``.

        ``loss`` must be the value ALREADY reduced across ranks (e.g. the all-reduced mean), the
        same float on every rank: the path depends on it, and every rank must take the same path.
        """
        b = self._member(bits)
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            raise PathConfigError(f"loss must be a number (got {loss!r})") from None
        self.visits[b] += 1
        if not math.isfinite(loss):
            self.skipped += 1
            return
        self._update(b, loss)

    def _update(self, b: int, loss: float) -> None:
        old = self.ema_loss[b]
        self.ema_loss[b] = loss if old is None else self.ema * old + (1 - self.ema) * loss

    def _member(self, bits: int) -> int:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in self.visits:
            raise PathConfigError(f"bit-width {bits!r} is not on this path ({format_bits(self.bits)})")
        return bits

    def scores(self) -> dict[int, float | None]:
        """Current normalised scores per bit-width (paths without a score: empty)."""
        return {}

    def describe(self) -> dict:
        """Config, counts and current scores, for logs (JSON-able)."""
        return {
            "path": self.name,
            "config": self.config_dict(),
            "steps": len(self.history),
            "visits": {str(b): n for b, n in self.visits.items()},
            "ema_loss": {str(b): e for b, e in self.ema_loss.items()},
            "scores": {str(b): s for b, s in self.scores().items()},
            "skipped": self.skipped,
        }

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-able state; :meth:`load_state_dict` on a scheduler built with the same config
        continues the exact same path."""
        return {
            "path": self.name,
            "config": self.config_dict(),
            "rng": _rng_to_json(self._rng.getstate()),
            "visits": [self.visits[b] for b in self.bits],
            "ema_loss": [self.ema_loss[b] for b in self.bits],
            "skipped": self.skipped,
            "pending": list(self._pending),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("path") != self.name:
            got = state.get("path") if isinstance(state, dict) else type(state).__name__
            raise PathConfigError(f"saved path state is for {got!r}, not {self.name!r}")
        if state.get("config") != self.config_dict():
            raise PathConfigError(
                f"saved {self.name} path was configured {state.get('config')}, this one {self.config_dict()}: "
                "resume with the same path settings"
            )
        try:
            n = len(self.bits)
            visits, ema_loss = list(state["visits"]), list(state["ema_loss"])
            if len(visits) != n or len(ema_loss) != n:
                raise ValueError("per-bit lists have the wrong length")
            pending = [self._member(b) for b in state["pending"]]
            history = [self._member(b) for b in state["history"]]
            rng = _rng_from_json(state["rng"])
            random.Random().setstate(rng)  # validate before touching self
            skipped = int(state["skipped"])
            self._load_extra(state)
        except (KeyError, TypeError, ValueError) as e:
            raise PathConfigError(f"corrupt {self.name} path state: {e}") from None
        self._rng.setstate(rng)
        self.visits = {b: int(v) for b, v in zip(self.bits, visits)}
        self.ema_loss = {b: (None if e is None else float(e)) for b, e in zip(self.bits, ema_loss)}
        self.skipped = skipped
        self._pending = pending
        self.history = history

    def _load_extra(self, state: dict) -> None:
        """Validate and load subclass state (raise KeyError/TypeError/ValueError when corrupt)."""


# ---------------------------------------------------------------------------------------------
# BPS


@dataclass(frozen=True)
class BPSConfig:
    """Knobs of the BPS path [OURS]; see the module docstring for their exact meaning."""

    bits: tuple[int, ...]
    segment_len: int = 16
    explore: str = "ucb"  # "ucb" | "epsilon"
    ucb_c: float = 1.0
    epsilon: float = 0.1
    ema: float = DEFAULT_EMA
    score: str = "gap"  # "gap" | "loss"
    top_every: int | None = None  # default: max(segment_len, 2)
    seed: int = 0

    def __post_init__(self):
        bits = _bit_set(self.bits)
        if len(bits) < 2:
            raise PathConfigError(
                f"BPS needs at least two distinct bit-widths (got {format_bits(bits) or 'none'}); "
                "to train one bit-width use the 'fixed' path"
            )
        object.__setattr__(self, "bits", bits)
        _check_int("segment_len", self.segment_len, 1)
        _check_choice("explore rule", self.explore, EXPLORE_RULES)
        _check_choice("score", self.score, SCORES)
        if _check_real("ucb_c", self.ucb_c) < 0:
            raise PathConfigError(f"ucb_c must be >= 0 (got {self.ucb_c!r})")
        if not 0 <= _check_real("epsilon", self.epsilon) <= 1:
            raise PathConfigError(f"epsilon must be in [0, 1] (got {self.epsilon!r})")
        if not 0 < _check_real("ema", self.ema) < 1:
            raise PathConfigError(f"ema must be in (0, 1) (got {self.ema!r})")
        if self.top_every is not None:
            _check_int("top_every", self.top_every, 2)
        _check_int("seed", self.seed, 0)

    @property
    def top_window(self) -> int:
        """Every window of this many consecutive steps holds the top precision at least once."""
        return max(2, self.segment_len) if self.top_every is None else self.top_every

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"] = list(self.bits)
        return d


class BPSPath(BitPath):
    """Exploitation-exploration bit-width path search [OURS] (module docstring)."""

    name = "bps"
    knobs = tuple(f.name for f in fields(BPSConfig) if f.name not in ("bits", "seed"))

    def __init__(self, config: BPSConfig):
        if not isinstance(config, BPSConfig):
            raise TypeError("BPSPath takes a BPSConfig; use make_path('bps', bits, seed, **knobs)")
        super().__init__(config.bits, seed=config.seed, ema=config.ema)
        self.config = config
        self.gap_ema: dict[int, float | None] = {b: None for b in self.bits}
        self._since_top = 0  # non-top slots at the end of the path built so far (pending included)

    @classmethod
    def from_knobs(cls, bits, seed: int = 0, **knobs) -> BPSPath:
        return cls(BPSConfig(bits=bits, seed=seed, **knobs))

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def _update(self, b: int, loss: float) -> None:
        super()._update(b, loss)
        ref = self.ema_loss[self.top]
        if b == self.top or ref is None:
            return
        sample = loss - ref
        old = self.gap_ema[b]
        self.gap_ema[b] = sample if old is None else self.ema * old + (1 - self.ema) * sample

    def raw_scores(self) -> dict[int, float]:
        """``s_b`` for the bit-widths that have one (before normalisation)."""
        if self.config.score == "loss":
            return {b: e for b, e in self.ema_loss.items() if e is not None}
        ref = self.ema_loss[self.top]
        out: dict[int, float] = {}
        for b in self.bits:
            if b == self.top:
                if ref is not None:
                    out[b] = 0.0
            elif self.gap_ema[b] is not None:
                out[b] = self.gap_ema[b]
            elif ref is not None and self.ema_loss[b] is not None:
                out[b] = self.ema_loss[b] - ref
        return out

    def scores(self) -> dict[int, float | None]:
        """Min-max normalised scores ``S_b`` in [0, 1] (None: no score yet, treated as 0)."""
        raw = self.raw_scores()
        if self.config.score == "gap":  # the top is not a candidate (see _choose): scale without it
            raw.pop(self.top, None)
        out: dict[int, float | None] = {b: None for b in self.bits}
        if raw:
            lo, hi = min(raw.values()), max(raw.values())
            for b, s in raw.items():
                out[b] = (s - lo) / (hi - lo) if hi > lo else 0.0
        return out

    def _build_segment(self) -> list[int]:
        cfg = self.config
        norm = {b: (s or 0.0) for b, s in self.scores().items()}
        virtual = {b: 0 for b in self.bits}
        segment = []
        for _ in range(cfg.segment_len):
            b = self._choose(norm, virtual)
            segment.append(b)
            virtual[b] += 1
            self._since_top = 0 if b == self.top else self._since_top + 1
        return segment

    def _choose(self, norm: dict[int, float], virtual: dict[int, int]) -> int:
        cfg, top = self.config, self.top
        if self._since_top >= cfg.top_window - 1:
            return top
        fresh = [b for b in self.bits if self.visits[b] == 0 and virtual[b] == 0]
        if fresh:
            return top if top in fresh else fresh[0]
        load = {b: self.visits[b] + virtual[b] for b in self.bits}
        # With the gap score the top precision has no lag by definition (s_T = 0): it would win
        # every argmax while the lower bit-widths' gaps are negative early in training (the
        # top's EMA still remembers the first, high losses) and the path would lock onto it.
        # Its slots come from the top guard instead; the argmax is over the lower bit-widths.
        candidates = [b for b in self.bits if not (cfg.score == "gap" and b == top)] or list(self.bits)
        if cfg.explore == "ucb":
            log_n = math.log(sum(load.values()) + 1)
            key = {b: norm[b] + cfg.ucb_c * math.sqrt(log_n / (load[b] + 1)) for b in candidates}
        else:
            if self._rng.random() < cfg.epsilon:
                return self._rng.choice(self.bits)
            key = {b: (norm[b], -load[b]) for b in candidates}
        best = candidates[0]
        for b in candidates[1:]:  # ascending: a tie keeps the lower bit-width
            if key[b] > key[best]:
                best = b
        return best

    def describe(self) -> dict:
        d = super().describe()
        d["gap_ema"] = {str(b): g for b, g in self.gap_ema.items()}
        return d

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["gap_ema"] = [self.gap_ema[b] for b in self.bits]
        state["since_top"] = self._since_top
        return state

    def _load_extra(self, state: dict) -> None:
        gap = list(state["gap_ema"])
        if len(gap) != len(self.bits):
            raise ValueError("gap_ema has the wrong length")
        since_top = state["since_top"]
        if isinstance(since_top, bool) or not isinstance(since_top, int) or since_top < 0:
            raise ValueError(f"bad since_top {since_top!r}")
        self.gap_ema = {b: (None if g is None else float(g)) for b, g in zip(self.bits, gap)}
        self._since_top = since_top


# ---------------------------------------------------------------------------------------------
# ablation baselines


class RoundRobinPath(BitPath):
    """Cycles through the bit-widths, lowest first (ablation)."""

    name = "round-robin"
    knobs = ("ema",)

    def _build_segment(self) -> list[int]:
        return list(self.bits)


class RandomPath(BitPath):
    """A uniform-random bit-width every step, seeded (ablation)."""

    name = "random"
    knobs = ("ema",)

    def _build_segment(self) -> list[int]:
        return [self._rng.choice(self.bits)]


class FixedPath(BitPath):
    """Always the same bit-width (one model per precision: the "model zoo" baseline)."""

    name = "fixed"
    knobs = ("ema",)
    single_bit = True

    def __init__(self, bits, seed: int = 0, ema: float = DEFAULT_EMA):
        super().__init__(bits, seed=seed, ema=ema)
        if len(self.bits) != 1:
            raise PathConfigError(f"the fixed path trains one bit-width (got {format_bits(self.bits)})")

    def _build_segment(self) -> list[int]:
        return [self.bits[0]]


PATHS: dict[str, type[BitPath]] = {cls.name: cls for cls in (BPSPath, RoundRobinPath, RandomPath, FixedPath)}


def make_path(name: str, bits: str | int | Iterable[int], seed: int = 0, **knobs) -> BitPath:
    """Build the path ``name`` over ``bits``.

    ``knobs`` go to the path that takes them; knobs of *other* registered paths are ignored (so
    a trainer can pass every path setting whatever the path), and a knob no path knows raises.
    """
    try:
        cls = PATHS[name]
    except (KeyError, TypeError):
        raise PathConfigError(f"unknown bit-width path {name!r}; choose one of: {', '.join(PATHS)}") from None
    known = {k for c in PATHS.values() for k in c.knobs}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise PathConfigError(
            f"unknown path setting(s) {', '.join(unknown)}; {name!r} takes {', '.join(cls.knobs) or 'none'}"
        )
    return cls.from_knobs(bits, seed, **{k: v for k, v in knobs.items() if k in cls.knobs})
