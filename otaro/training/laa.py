"""LAA -- low-precision asynchronous accumulation, as a state machine the trainer drives.

Our design [OURS]: the OTARo paper (arXiv 2511.13147) says LAA "performs asynchronous gradient
accumulations and delayed updates under low bit-widths"; its threshold, accumulation length,
averaging and optimizer-state handling could not be recovered. The rules below are ours.

* A step at ``bits <= threshold`` is *low-bit*: its gradient is added to the accumulator
  (``p.grad``; no optimizer step). The ``k``-th pending low-bit gradient triggers the *delayed
  update*: the accumulated gradient is divided by ``divisor`` and the optimizer steps once.
* A step at ``bits > threshold`` is *high-bit* and updates immediately. If low-bit gradients are
  pending, they are flushed first (their own delayed update, ``flush_before``), so high- and
  low-bit gradients never mix in one update.
* ``divisor``: ``p.grad / divisor == scale * mean`` (``reduce="mean"``: ``divisor = count /
  scale``) or ``scale * sum`` (``reduce="sum"``: ``divisor = 1 / scale``) of the pending low-bit
  gradients. Plain steps have ``divisor == 1``.
* Optimizer state: one delayed update is ONE optimizer step -- Adam's moments and its step
  counter advance once per flush, fed the averaged low-bit gradient; high-bit steps advance them
  once each. (Decoupled weight decay is likewise applied once per optimizer step.) The learning
  rate of a flush is the one in force at the step that applies it.
* End of training: the trainer applies what is still pending (:meth:`LAA.flush_plan`). At a
  checkpoint the pending gradients are either saved with it (LAA's own state only holds counts)
  or flushed at every checkpoint step (the same in an uninterrupted run, so resume stays exact).
* Disabled (``enabled=False``): every step is a plain immediate update.

The trainer's loop, per step at ``bits``::

    plan = laa.plan(bits)
    if plan.flush_before:                     # pending low-bit gradients, then a high-bit step
        apply_flush(params, plan.divisor); optimizer.step(); optimizer.zero_grad()
    loss = forward(bits); loss.backward()     # adds to p.grad (the accumulator)
    if plan.step_after:
        if plan.accumulate:                   # the k-th low-bit step: the delayed update
            apply_flush(params, plan.divisor)
        optimizer.step(); optimizer.zero_grad()
    laa.commit(plan)

Several processes: a step with ``accumulate`` may run its backward under DDP's ``no_sync()``;
the accumulated gradients must then be averaged across ranks (all-reduce, mean) before
``apply_flush`` at either kind of flush.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from otaro.errors import OtaroError
from otaro.formats import check_bits

REDUCTIONS = ("mean", "sum")


class LAAConfigError(OtaroError, ValueError):
    """A bad LAA configuration, plan or saved state."""


@dataclass(frozen=True)
class LAAConfig:
    """LAA knobs [OURS]: ``threshold`` (bit-widths <= it are low-bit), ``k`` (low-bit gradients
    per delayed update), ``reduce`` ("mean" | "sum" of the accumulated gradients) and ``scale``
    (a factor on the delayed update)."""

    enabled: bool = True
    threshold: int = 4
    k: int = 4
    reduce: str = "mean"
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise LAAConfigError(f"LAA enabled must be true or false (got {self.enabled!r})")
        try:
            check_bits(self.threshold)
        except OtaroError as e:
            raise LAAConfigError(f"LAA threshold: {e}") from None
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise LAAConfigError(f"LAA k (low-bit steps per delayed update) must be an integer >= 1 (got {self.k!r})")
        if self.reduce not in REDUCTIONS:
            raise LAAConfigError(f"unknown LAA reduce {self.reduce!r}; choose one of {', '.join(REDUCTIONS)}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise LAAConfigError(f"LAA scale must be a finite number > 0 (got {s!r})")


@dataclass(frozen=True)
class StepPlan:
    """What the trainer does around one step (see the module docstring).

    ``flush_before``: apply the pending low-bit accumulation (one optimizer step) BEFORE this
    step's forward. ``accumulate``: this step's gradient goes to the accumulator (no update of its
    own). ``step_after``: run the optimizer after this step's backward (a high-bit step; or the
    k-th pending low-bit step, which is a flush: ``flush_after``). ``divisor``: divide the
    accumulated gradient by it at this plan's flush (1.0 when there is none). ``flush_count``:
    low-bit gradients in that flush. ``pending``: the pending count the plan was made from.
    ``bits`` is None for :meth:`LAA.flush_plan`.
    """

    bits: int | None
    flush_before: bool
    accumulate: bool
    step_after: bool
    divisor: float = 1.0
    flush_count: int = 0
    pending: int = 0

    @property
    def flush_after(self) -> bool:
        """This step's backward completes a delayed update (divide by ``divisor``, then step)."""
        return self.accumulate and self.step_after

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps this plan causes (0, 1 or 2)."""
        return int(self.flush_before) + int(self.step_after)


class LAA:
    """The LAA state machine: ``plan(bits)`` -> do it -> ``commit(plan)``."""

    def __init__(self, config: LAAConfig | None = None):
        if config is None:
            config = LAAConfig()
        if not isinstance(config, LAAConfig):
            raise TypeError("LAA takes an LAAConfig")
        self.config = config
        self.pending = 0  # low-bit gradients in the accumulator
        self.flushes = 0  # delayed updates applied
        self.updates = 0  # optimizer steps (flushes included)
        self.steps = 0  # committed training steps

    def is_low(self, bits: int) -> bool:
        return self.config.enabled and bits <= self.config.threshold

    def _divisor(self, count: int) -> float:
        base = float(count) if self.config.reduce == "mean" else 1.0
        return base / self.config.scale

    def flush_divisor(self) -> float:
        """Divisor for flushing what is pending now (1.0 when nothing is)."""
        return self._divisor(self.pending) if self.pending else 1.0

    def plan(self, bits: int) -> StepPlan:
        """The plan for a step at ``bits`` (does not change the state; :meth:`commit` does)."""
        check_bits(bits)
        n = self.pending
        if not self.config.enabled:
            return StepPlan(bits, flush_before=False, accumulate=False, step_after=True, pending=n)
        if not self.is_low(bits):
            if n:
                return StepPlan(bits, True, False, True, self._divisor(n), n, n)
            return StepPlan(bits, False, False, True, pending=n)
        if n + 1 >= self.config.k:
            return StepPlan(bits, False, True, True, self._divisor(n + 1), n + 1, n)
        return StepPlan(bits, False, True, False, pending=n)

    def flush_plan(self) -> StepPlan:
        """A plan with no step that flushes what is pending (end of training, or a checkpoint
        that does not save gradients); ``flush_before`` is False when nothing is pending."""
        n = self.pending
        return StepPlan(None, n > 0, False, False, self.flush_divisor(), n, n)

    def commit(self, plan: StepPlan) -> None:
        """Record that ``plan`` (the latest from :meth:`plan` / :meth:`flush_plan`) was carried out."""
        if not isinstance(plan, StepPlan):
            raise TypeError("commit takes the StepPlan returned by plan()")
        if plan.pending != self.pending:
            raise LAAConfigError(
                f"stale LAA plan: made with {plan.pending} pending low-bit gradients, now {self.pending}"
            )
        if plan.flush_before:
            self.pending = 0
            self.flushes += 1
            self.updates += 1
        if plan.accumulate:
            self.pending += 1
        if plan.step_after:
            self.updates += 1
            if plan.accumulate:
                self.pending = 0
                self.flushes += 1
        if plan.bits is not None:
            self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able counts (the accumulated gradients themselves live in ``p.grad``)."""
        return {"config": asdict(self.config), "pending": self.pending, "flushes": self.flushes,
                "updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("config") != asdict(self.config):
            got = state.get("config") if isinstance(state, dict) else state
            raise LAAConfigError(f"saved LAA state was configured {got}, this run {asdict(self.config)}: "
                                 "resume with the same LAA settings")
        try:
            counts = {k: state[k] for k in ("pending", "flushes", "updates", "steps")}
        except KeyError as e:
            raise LAAConfigError(f"corrupt LAA state: missing {e}") from None
        for key, v in counts.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LAAConfigError(f"corrupt LAA state: {key} = {v!r}")
        limit = self.config.k - 1 if self.config.enabled else 0
        if counts["pending"] > limit:
            raise LAAConfigError(f"corrupt LAA state: {counts['pending']} pending with k={self.config.k}")
        self.pending, self.flushes = counts["pending"], counts["flushes"]
        self.updates, self.steps = counts["updates"], counts["steps"]


def apply_flush(params: Iterable, divisor: float) -> None:
    """Divide every ``p.grad`` in place by ``divisor`` (parameters without a gradient are
    skipped); ``params`` is an iterable of tensors or a module. Reference helper for the trainer."""
    d = float(divisor)
    if not math.isfinite(d) or d <= 0:
        raise LAAConfigError(f"flush divisor must be a finite number > 0 (got {divisor!r})")
    if hasattr(params, "parameters"):
        params = params.parameters()
    if d == 1.0:
        return
    import torch  # lazily: the rest of this module is pure Python

    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.div_(d)
