"""LAA -- low-precision asynchronous accumulation, as a state machine the trainer drives.

Our design [OURS]: the OTARo paper (arXiv 2511.13147) says LAA "performs asynchronous gradient
accumulations and delayed updates under low bit-widths"; its threshold, accumulation length,
averaging and optimizer-state handling could not be recovered. The rules below are ours.

Why the rule is what it is -- the starvation defect of the first version. That version
accumulated each low-bit gradient in ``p.grad`` *without an optimizer step* and applied the sum
as one delayed update every ``k`` low-bit steps (or just before the next high-bit step). So
``k - 1`` of every ``k`` low-bit steps made no update at all. BPS's default ``gap`` score steers
the path toward the low bit-widths (their loss gap to the top precision is the largest), so most
steps were low-bit and roughly one in ``k`` of them updated: the SmolLM2 benchmark made 15
optimizer updates in 32 steps. Worse, the LR schedule follows path steps, so warm-up and decay
were spent on steps that changed nothing, and a run with LAA trained on about half the updates
of the ablation without it. The rule below keeps what LAA is for (low-bit STE gradients are
noisy, so a low-bit update uses an average of several low-bit gradients, never mixed with
high-bit ones) without ever skipping an update.

* Every step makes exactly ONE optimizer step: ``N`` steps give ``N`` updates (no lag), and
  Adam's moments, its step counter and the LR schedule all advance once per step.
* A step at ``bits > threshold`` is *high-bit*: a plain update with its own gradient. It also
  restarts the low-bit window, so high- and low-bit gradients never mix in one update.
* A step at ``bits <= threshold`` is *low-bit*: its gradient ``g`` joins a running mean ``A`` of
  the low-bit gradients since the last high-bit step, over a window of at most ``k``::

      n = min(pending + 1, k);   A_n = ((n - 1) * A_{n-1} + g) / n

  While the window fills, ``A_n`` is exactly the mean of the ``n`` pending gradients (what the
  old delayed update applied once); once it is full the newest gradient gets weight ``1/k`` and
  older ones decay geometrically (an exponential average), which needs one buffer -- ``p.grad``
  itself -- instead of ``k`` stored gradients. The optimizer steps on ``scale * A_n``
  (``reduce="mean"``) or ``scale * n * A_n`` (``reduce="sum"``).
* Bounded delay: every gradient is in the update of its own step (delay 0), and keeps a
  decaying share of the next low-bit updates until a high-bit step restarts the window. That is
  the "asynchronous accumulation": a low-bit gradient is applied partly at once and partly
  later, while high-bit steps update at their own cadence.
* Disabled (``enabled=False``), or ``k == 1``: every step is a plain update of its own gradient.
* Nothing is ever left unapplied, so the end of training needs no flush. The accumulator
  (``p.grad`` after a low-bit step) is saved with a checkpoint whenever the window is non-empty,
  so a resumed run continues the same running mean.

The trainer's loop, per step at ``bits``::

    plan = laa.plan(bits)
    scale_grads(params, plan.keep * loss_scale)   # (n-1) * A in the backward's scale; 0: start afresh
    loss = forward(bits); loss.backward()         # p.grad = (n-1) * A + g
    scale_grads(params, plan.grad_factor)         # p.grad = grad_scale * A_n
    optimizer.step()                              # (clipping, if any, scales p.grad by c)
    if plan.low: scale_grads(params, 1 / (plan.grad_scale * c))   # back to A_n, the accumulator
    else: optimizer.zero_grad()
    laa.commit(plan)

Several processes: every backward runs synchronised (DDP all-reduces the whole ``p.grad``);
the accumulators are then equal on every rank, so the mean of ``(n-1) * A + g_rank`` over ranks
is ``(n-1) * A + mean(g)``, the single-process value.
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
    """LAA knobs [OURS]: ``threshold`` (bit-widths <= it are low-bit), ``k`` (the averaging
    window: at most ``k`` low-bit gradients in each low-bit update), ``reduce`` ("mean" | "sum"
    of the window) and ``scale`` (a factor on the low-bit update)."""

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
            raise LAAConfigError(f"LAA k (the low-bit averaging window) must be an integer >= 1 (got {self.k!r})")
        if self.reduce not in REDUCTIONS:
            raise LAAConfigError(f"unknown LAA reduce {self.reduce!r}; choose one of {', '.join(REDUCTIONS)}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise LAAConfigError(f"LAA scale must be a finite number > 0 (got {s!r})")


@dataclass(frozen=True)
class StepPlan:
    """What the trainer does around one step (see the module docstring).

    ``low``: the gradient joins the low-bit running mean and the accumulator survives the step.
    ``window``: ``n``, the low-bit gradients in this update's mean (0 for a plain step).
    ``grad_scale``: the optimizer steps on ``grad_scale * mean`` (1 for a plain step).
    ``pending``: the window the plan was made from (a stale plan is refused at commit).
    Every plan is exactly one optimizer step.
    """

    bits: int
    low: bool
    window: int = 0
    grad_scale: float = 1.0
    pending: int = 0

    @property
    def keep(self) -> float:
        """Factor on the accumulator before the backward adds this step's gradient: ``n - 1``
        (0: the window starts afresh, ``p.grad`` is dropped)."""
        return float(self.window - 1) if self.low else 0.0

    @property
    def grad_factor(self) -> float:
        """Factor on ``p.grad`` after the backward: turns ``(n-1) A + g`` into ``grad_scale * A_n``."""
        return self.grad_scale / self.window if self.low else 1.0

    @property
    def optimizer_steps(self) -> int:
        return 1


class LAA:
    """The LAA state machine: ``plan(bits)`` -> do it -> ``commit(plan)``."""

    def __init__(self, config: LAAConfig | None = None):
        if config is None:
            config = LAAConfig()
        if not isinstance(config, LAAConfig):
            raise TypeError("LAA takes an LAAConfig")
        self.config = config
        self.pending = 0  # low-bit gradients in the running mean held in p.grad (<= k)
        self.low_updates = 0  # updates made from the low-bit running mean
        self.updates = 0  # optimizer steps (== steps: LAA never skips one)
        self.steps = 0  # committed training steps

    def is_low(self, bits: int) -> bool:
        return self.config.enabled and bits <= self.config.threshold

    def plan(self, bits: int) -> StepPlan:
        """The plan for a step at ``bits`` (does not change the state; :meth:`commit` does)."""
        check_bits(bits)
        if not self.is_low(bits) or self.config.k == 1:  # a window of one is a plain update
            return StepPlan(bits, low=False, pending=self.pending)
        n = min(self.pending + 1, self.config.k)
        base = 1.0 if self.config.reduce == "mean" else float(n)
        return StepPlan(bits, low=True, window=n, grad_scale=base * self.config.scale, pending=self.pending)

    def commit(self, plan: StepPlan) -> None:
        """Record that ``plan`` (the latest from :meth:`plan`) was carried out."""
        if not isinstance(plan, StepPlan):
            raise TypeError("commit takes the StepPlan returned by plan()")
        if plan.pending != self.pending:
            raise LAAConfigError(
                f"stale LAA plan: made with {plan.pending} low-bit gradients in the window, now {self.pending}"
            )
        self.pending = plan.window if plan.low else 0
        self.low_updates += int(plan.low)
        self.updates += plan.optimizer_steps
        self.steps += 1

    def reset_window(self) -> None:
        """Forget the accumulator (the trainer dropped ``p.grad``, e.g. after an fp16 overflow
        made the optimizer skip its step and left non-finite gradients behind)."""
        self.pending = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able counts (the running mean itself lives in ``p.grad``)."""
        return {"config": asdict(self.config), "pending": self.pending, "low_updates": self.low_updates,
                "updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("config") != asdict(self.config):
            got = state.get("config") if isinstance(state, dict) else state
            raise LAAConfigError(f"saved LAA state was configured {got}, this run {asdict(self.config)}: "
                                 "resume with the same LAA settings")
        try:
            counts = {k: state[k] for k in ("pending", "low_updates", "updates", "steps")}
        except KeyError as e:
            raise LAAConfigError(f"corrupt LAA state: missing {e}") from None
        for key, v in counts.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LAAConfigError(f"corrupt LAA state: {key} = {v!r}")
        limit = self.config.k if self.config.enabled else 0
        if counts["pending"] > limit:
            raise LAAConfigError(f"corrupt LAA state: {counts['pending']} pending with k={self.config.k}")
        self.pending, self.low_updates = counts["pending"], counts["low_updates"]
        self.updates, self.steps = counts["updates"], counts["steps"]


def scale_grads(params: Iterable, factor) -> None:
    """Multiply every ``p.grad`` in place by ``factor`` (a float or a 0-d tensor); a factor of 0
    drops the gradients (``p.grad = None``: the next backward starts afresh, and no ``0 * inf``
    NaN can survive). Parameters without a gradient are skipped; ``params`` is an iterable of
    tensors or a module."""
    import torch  # lazily: the rest of this module is pure Python

    if hasattr(params, "parameters"):
        params = params.parameters()
    grads_of = [p for p in params if p.grad is not None]
    if not torch.is_tensor(factor):
        f = float(factor)
        if not math.isfinite(f) or f < 0:
            raise LAAConfigError(f"gradient factor must be a finite number >= 0 (got {factor!r})")
        if f == 0.0:
            for p in grads_of:
                p.grad = None
            return
        if f == 1.0:
            return
    with torch.no_grad():
        for p in grads_of:
            p.grad.mul_(factor.to(p.grad.device) if torch.is_tensor(factor) else factor)
