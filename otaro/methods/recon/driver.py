"""The block-reconstruction driver: windows of decoder blocks, fp targets, quantized inputs.

Quantizer- and optimiser-agnostic (research notes §2c): a method supplies ``make_tunable``
(one learnable stand-in per linear, see :class:`Tunable`) and ``make_optimizer``; the driver
runs the window policy (:func:`plan_windows`) over the model, in place:

* **Targets** come from the fp model on the fp activation stream: the blocks of a window are
  still fp when it is reached, so the target is simply those blocks run on the fp stream.
* **The quantized branch** is fed by the already-quantized prefix (auto-round's default):
  one stream per target bit-width ``b`` (``calib.streams_for``), each run through the packed
  prefix at precision b, exactly as ``calib.sequential_quantize`` does for GPTQ.
* **Loss** per step: Σ_b w_b · MSE(T_fp(x_fp), T_q(x_q,b; b)) over a minibatch of calibration
  windows, w_b the noise-normalised λ_b (``sefp_quantizer.noise_weights``, §7.11), normalised
  to sum 1; one stream (weight 1) for a fixed-precision format.
* **Kept iterate:** the final one (the seed-001 scripts), unless its loss over *all* the
  calibration windows is above the starting point's (RTN; pow2 SEFP: RTN at the searched
  exponents), in which case the window goes back to that start: it never ends worse than its
  start on its own data.

The result is what ``convert``/``sequential_quantize`` produce: the same packed layer classes,
``model.otaro`` attached, SEFP layers at their top precision.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from otaro.errors import OtaroError
from otaro.methods.calib import Stream, capture_layer_inputs, run_layer
from otaro.progress import progress as progress_bar

log = logging.getLogger(__name__)

POLICIES = ("sb", "la", "mb")


@dataclass(frozen=True)
class Window:
    """One optimisation: the blocks tuned together, and the block whose output the loss is at
    (``end`` > the last tuned block only for look-ahead: those blocks stay fp and frozen)."""

    tuned: tuple[int, ...]
    end: int


def plan_windows(n_layers: int, policy: str, blocks: int) -> list[Window]:
    """SB: each block alone. LA-n: block k tuned, loss at block min(k+n-1, L-1), stride 1.
    MB-n: blocks k..k+n-1 tuned jointly, the next window at k+n (no overlap; the last may be
    shorter)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown window policy {policy!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise OtaroError(f"--recon-blocks must be at least 1 (got {blocks!r})")
    if blocks > n_layers:
        raise OtaroError(f"--recon-blocks {blocks} is larger than the model's {n_layers} decoder layers")
    if policy == "sb":
        if blocks != 1:
            raise OtaroError(f"sb tunes one block against its own output; --recon-blocks {blocks} needs la or mb")
        return [Window((k,), k) for k in range(n_layers)]
    if policy == "la":
        return [Window((k,), min(k + blocks - 1, n_layers - 1)) for k in range(n_layers)]
    return [Window(tuple(range(k, min(k + blocks, n_layers))), min(k + blocks, n_layers) - 1)
            for k in range(0, n_layers, blocks)]


class Tunable(Protocol):
    """A learnable stand-in for one linear during its window (an ``nn.Module``)."""

    def refresh(self, bits: int | None) -> None:
        """Compute the fake-quantized weight at ``bits`` (None: the format's one precision),
        with its autograd graph; the forward passes use it until the next refresh."""

    def project_(self) -> None:
        """Clamp the parameters back into their ranges after a step."""

    def build(self) -> nn.Module:
        """The packed quantized layer from the learned parameters."""


@dataclass(frozen=True)
class ReconSettings:
    """What the driver needs from the config, resolved (``settings.resolve_recon_options``)."""

    policy: str  # "sb" | "la" | "mb"
    blocks: int  # n of LA-n / MB-n (1 for sb)
    steps: int  # optimiser steps per window
    batch: int  # calibration windows per step (capped at the number drawn)
    seed: int  # of the minibatch order


class SignSGD:
    """p ← p − lr_t · sign(∂L/∂p) with lr_t = lr · (1 − t/steps): SignRound's optimiser and
    auto-round's linear decay to 0 (so with lr = 1/steps no entry moves by more than 0.5)."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, steps: int):
        self.params, self.lr, self.steps, self.t = list(params), float(lr), int(steps), 0

    @torch.no_grad()
    def step(self) -> None:
        lr_t = self.lr * (1 - self.t / self.steps)
        for p in self.params:
            if p.grad is not None:
                p.add_(torch.sign(p.grad), alpha=-lr_t)
        self.t += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def stream_weights(streams: Sequence[Stream]) -> list[float]:
    """Loss weight per stream: λ_b noise-normalised (λ_b · 4^(b-8), §7.11), summing to 1."""
    from otaro.methods.sefp_quantizer import noise_weights

    raw = [float(w) if b is None else noise_weights({b: w})[b] for w, b in streams]
    total = sum(raw)
    return [w / total for w in raw]


def _set_child(layer: nn.Module, rel: str, module: nn.Module) -> None:
    parent, _, child = rel.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, module)


def _run(layers, first: int, last: int, hidden: torch.Tensor, extra) -> torch.Tensor:
    for j in range(first, last + 1):
        hidden = run_layer(layers[j], hidden, extra[j])
    return hidden


class _Batches:
    """Seeded minibatches of window indices: consecutive slices of a fresh permutation per pass."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, min(batch, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def _window_loss(layers, win: Window, tunables, inputs, target, extra, streams, weights, idx=None) -> torch.Tensor:
    """Σ_b w_b MSE over the windows ``idx`` (None: all of them, one at a time, no graph kept)."""
    total = torch.zeros((), dtype=torch.float32, device=target.device)
    for x, (_, bits), w in zip(inputs, streams, weights):
        for t in tunables:
            t.refresh(bits)
        if idx is None:
            err = 0.0
            for k in range(x.shape[0]):
                out = _run(layers, win.tuned[0], win.end, x[k : k + 1], extra)
                err = err + F.mse_loss(out.float(), target[k : k + 1].float(), reduction="sum")
            total = total + w * err / target.numel()
        else:
            out = _run(layers, win.tuned[0], win.end, x[idx], extra)
            loss = w * F.mse_loss(out.float(), target[idx].float())
            loss.backward()  # per stream: one precision's graph alive at a time
            total = total + loss.detach()
    return total


def _optimise(model, layers, win: Window, tl, h_q, target, extra, streams, weights, opt, settings: ReconSettings,
              n_win: int, show: bool):
    """One window's steps; returns (start loss, final loss, kept, names that got a gradient)."""
    start = [p.detach().clone() for t in tl for p in t.parameters()]
    with torch.no_grad():
        loss0 = float(_window_loss(layers, win, tl, h_q, target, extra, streams, weights))
    batches = _Batches(h_q[0].shape[0], settings.batch, settings.seed + n_win)
    grad_params: list[str] = []
    # A window is the long loop (minutes on a CPU for a real block): its own transient bar, shown
    # only when the caller reports progress (the CLI), beside the caller's per-layer one.
    bar = progress_bar(total=settings.steps, desc=f"blocks {win.tuned[0]}-{win.tuned[-1]}", unit="step", enabled=show)
    with bar, torch.enable_grad():  # callers may hold no_grad (as benchmarks do around method.run)
        for step in range(settings.steps):
            _window_loss(layers, win, tl, h_q, target, extra, streams, weights, idx=batches.next())
            if step == 0:
                grad_params = [n for n, p in model.named_parameters() if p.grad is not None]
            opt.step()
            opt.zero_grad(set_to_none=True)
            for t in tl:
                t.project_()
            bar.update(1)
        with torch.no_grad():
            loss1 = float(_window_loss(layers, win, tl, h_q, target, extra, streams, weights))
            kept = loss1 <= loss0
            if not kept:  # back to the starting point (RTN, or the searched pow2 exponents)
                for p, p0 in zip((p for t in tl for p in t.parameters()), start):
                    p.copy_(p0)
        bar.set_postfix_str(f"loss {loss0:.3g} -> {loss1:.3g}" + ("" if kept else " (kept the start)"))
    return loss0, loss1, kept, grad_params


def reconstruct(model, fmt, windows: torch.Tensor, streams: Sequence[Stream], settings: ReconSettings,
                make_tunable: Callable[[str, nn.Linear], nn.Module],
                make_optimizer: Callable[[list[nn.Module], int], object],
                progress=None, observer=None) -> list[dict]:
    """Quantize the adapter's linears window by window, in place; returns one report per window
    (tuned blocks, loss block, starting/final loss, kept, the parameters that got a gradient).

    ``observer(report, model)``, if given, is called after each window's optimisation, before
    its linears are packed (tests inspect which blocks are fp and frozen there).
    ``progress(name)`` is called after each linear is packed."""
    from otaro.arch import get_adapter, get_layers
    from otaro.modules import QuantInfo, SEFPLinear, attach, set_precision

    adapter = get_adapter(model)
    if getattr(model, "otaro", None) is not None:
        raise OtaroError("model is already quantized")
    layers = get_layers(model, adapter)
    plan = plan_windows(len(layers), settings.policy, settings.blocks)  # refuses before any work
    if settings.steps < 1:
        raise OtaroError(f"block reconstruction needs at least one step per window (got {settings.steps})")
    for i, layer in enumerate(layers):
        for rel in adapter.linear_names:
            if not isinstance(layer.get_submodule(rel), nn.Linear):
                raise OtaroError(f"{adapter.layers_path}.{i}.{rel} is {type(layer.get_submodule(rel)).__name__}, "
                                 "expected nn.Linear")
    weights = stream_weights(streams)
    device = next(model.parameters()).device
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in flags:
        p.requires_grad_(False)  # only the tunables' own parameters learn
    reports: list[dict] = []
    names: list[str] = []
    try:
        with torch.no_grad():
            hidden0, extra = capture_layer_inputs(model, layers, windows.to(device))
        h_fp = hidden0
        h_q = [hidden0] + [hidden0.clone() for _ in streams[1:]]
        for n_win, win in enumerate(plan):
            with torch.no_grad():  # fp targets: the window's blocks are all still fp here
                next_fp = _run(layers, win.tuned[0], win.tuned[-1], h_fp, extra)
                target = _run(layers, win.tuned[-1] + 1, win.end, next_fp, extra)
            tunables: dict[str, nn.Module] = {}
            for j in win.tuned:
                for rel in adapter.linear_names:
                    name = f"{adapter.layers_path}.{j}.{rel}"
                    tunables[name] = make_tunable(name, layers[j].get_submodule(rel))
                    _set_child(layers[j], rel, tunables[name])
            tl = list(tunables.values())
            loss0, loss1, kept, grad_params = _optimise(model, layers, win, tl, h_q, target, extra, streams, weights,
                                                        make_optimizer(tl, settings.steps), settings, n_win,
                                                        show=progress is not None)
            report = {"tuned": list(win.tuned), "end": win.end, "loss_start": loss0, "loss_final": loss1,
                      "kept": kept, "grad_params": grad_params}
            reports.append(report)
            log.info("blocks %s (loss at %d): %.4g -> %.4g%s", list(win.tuned), win.end, loss0, loss1,
                     "" if kept else " (worse: kept the start)")
            if observer is not None:
                observer(report, model)
            with torch.no_grad():
                for j in win.tuned:
                    for rel in adapter.linear_names:
                        name = f"{adapter.layers_path}.{j}.{rel}"
                        _set_child(layers[j], rel, tunables.pop(name).build())
                        names.append(name)
                        if progress:
                            progress(name)
            attach(model, QuantInfo(fmt, adapter.name, tuple(names)))
            if win.tuned[-1] + 1 < len(layers):  # the inputs of the next window's quantized branch
                with torch.no_grad():
                    for s, (_, bits) in enumerate(streams):
                        if bits is not None:
                            for j in win.tuned:
                                for m in layers[j].modules():
                                    if isinstance(m, SEFPLinear):
                                        m.set_bits(bits)
                        h_q[s] = _run(layers, win.tuned[0], win.tuned[-1], h_q[s], extra)
                h_fp = next_fp
        if fmt.family == "sefp":  # as convert leaves a packed SEFP model
            set_precision(model, fmt.top_bits)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return reports


def steps_for_epochs(epochs: int, n_windows: int, batch: int) -> int:
    """Optimiser steps of ``epochs`` passes over ``n_windows`` in minibatches of ``batch``."""
    return epochs * math.ceil(n_windows / min(batch, n_windows))
