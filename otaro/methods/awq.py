"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling + clipping, for int formats.

Per decoder block, on the inputs of the already-quantized prefix (as GPTQ's driver):

1. **Scale search.** For every ``ScaleGroup`` of the architecture (``otaro.arch``: a norm or a
   linear and the linears that read its output) the scale of input channel j is
   ``s_j = mean|x_j|^α`` (llm-awq: clamped at 1e-4, normalised by sqrt(max s · min s)) for α
   on a 20-point grid over [0, 1); the linears are fake-quantized as Q(W·diag(s))·diag(s)⁻¹
   (the format's own RTN, fp16 scales included) and α is chosen by the block-output MSE (norm
   groups: the decoder layer's output; linear -> linear groups: the output of the reading
   linears, computed exactly from their input Hessian — llm-awq inspects those same modules).
   α = 0 (s = 1) is on the grid, so the search never does worse than no scaling on its data.
2. **Fold.** s is folded into the float model: prev's output divided by s (a norm's weight and
   bias; Gemma's (1 + w) norm gets w' = (1 + w)/s − 1; a linear's output rows and bias, and
   the lora_B rows of any LoRA adapter on it), the linears' input columns multiplied by s (and
   the lora_A columns). The fold is checked on one calibration window: if the float block
   output moves (a layout the table gets wrong, a norm that does not multiply by its weight),
   the fold is undone and the group keeps s = 1 (clip search only), with a warning. GQA
   (v_proj narrower than o_proj's input) is skipped the same way, by the shape check.
3. **Clip search.** Per linear, per output row and group of G inputs, the group's range is
   shrunk by r ∈ {1, 0.95, …, 0.55} (sym: ±r·max|w|; asym: [r·min, r·max]) and the r with the
   lowest output error ‖(W − Q(clip_r W)) X‖² of that group (exact, from the G×G diagonal
   block of the input Hessian) is kept; the linear is then RTN-coded from the clipped weights,
   so the stored layout is RTN's ``IntLinear``.

The per-linear pieces (``activation_scales``, ``fake_quant``, ``clip_weight``, ``fold_scales``,
``input_stats``) are shared with the multi-task methods (``otaro.methods.multitask``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from otaro.errors import OtaroError
from otaro.formats import torch_ref as Q
from otaro.methods import Method, register_method

log = logging.getLogger(__name__)

SCALE_GRID = tuple(i / 20 for i in range(20))  # α: llm-awq's n_grid = 20 over [0, 1)
CLIP_GRID = tuple(1 - i / 20 for i in range(10))  # llm-awq: max_shrink 0.5 on a 20-point grid
# Relative change of the float block output a fold may cause (fp32 rounding of w/s and w·s is
# ~1e-7 relative; a wrong fold moves the output by O(1)).
FOLD_RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# Per-linear pieces
# --------------------------------------------------------------------------------------------


def fake_quant(W: torch.Tensor, fmt) -> torch.Tensor:
    """W after the format's round-to-nearest (what ``IntLinear.from_linear`` would store)."""
    codes, scale, zero = Q.int_encode(W, fmt)
    return Q.int_dequantize(codes, scale, zero, fmt, W.shape[1])


def activation_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """llm-awq's s = mean|x|^α, clamped at 1e-4, normalised so that max·min = 1."""
    s = absmean.to(torch.float32).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_error(Ws: Sequence[torch.Tensor], s: torch.Tensor, fmt) -> list[torch.Tensor]:
    """ΔW = W − Q(W·diag(s))·diag(s)⁻¹ of each linear (the error in the original input frame)."""
    return [W - fake_quant(W * s, fmt) / s for W in Ws]


def output_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ): with H = 2/n Σ x xᵀ, twice the mean squared output error of ΔW = D."""
    return float(((D.double() @ H.double()) * D.double()).sum())


def clip_weight(W: torch.Tensor, H: torch.Tensor, fmt, grid: Sequence[float] = CLIP_GRID) -> torch.Tensor:
    """W with each (row, group) range shrunk by the ratio of ``grid`` that minimises that
    group's output error ‖(W − Q(clip W))_g X_g‖² (H: the input Hessian, [in, in])."""
    W = W.detach().to(torch.float32)
    out, n_in = W.shape
    G = fmt.group_size
    Wp = Q.pad_groups(W, G)
    in_p = Wp.shape[1]
    n_groups = in_p // G
    Hp = torch.zeros(in_p, in_p, dtype=torch.float32, device=W.device)
    Hp[:n_in, :n_in] = H.to(torch.float32)
    C = torch.stack([Hp[g * G:(g + 1) * G, g * G:(g + 1) * G] for g in range(n_groups)])  # [groups, G, G]
    Wg = Wp.view(out, n_groups, G)
    if fmt.symmetric:
        hi = Wg.abs().amax(-1, keepdim=True)
        lo = -hi
    else:
        lo = Wg.amin(-1, keepdim=True).clamp(max=0)
        hi = Wg.amax(-1, keepdim=True).clamp(min=0)
    best = Wg.clone()
    best_err = torch.full((out, n_groups), float("inf"), dtype=torch.float32, device=W.device)
    for r in grid:
        Wc = torch.maximum(torch.minimum(Wg, r * hi), r * lo)
        D = Wg - fake_quant(Wc.reshape(out, in_p), fmt).view(out, n_groups, G)
        err = torch.einsum("ogk,gkl,ogl->og", D, C, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = Wc[better]
    return best.reshape(out, in_p)[:, :n_in].contiguous()


def quantize_clipped(linear: nn.Linear, H: torch.Tensor, fmt, clip: bool = True) -> nn.Module:
    """The packed ``IntLinear`` of ``linear``, RTN-coded after the clip search."""
    from otaro.modules import IntLinear

    W = linear.weight.detach().to(torch.float32)
    Q.check_finite(W, "weight")
    Wc = clip_weight(W, H, fmt) if clip else W
    return IntLinear.from_codes(linear, fmt, *Q.int_encode(Wc, fmt))


# --------------------------------------------------------------------------------------------
# Block inputs
# --------------------------------------------------------------------------------------------


@dataclass
class InputStats:
    """Statistics of one linear input over n tokens: mean |x| per channel and H = 2/n Σ x xᵀ."""

    absmean: torch.Tensor
    H: torch.Tensor
    n: int

    def scaled(self, s: torch.Tensor) -> "InputStats":
        """The statistics of x / s (after s is folded)."""
        return InputStats(self.absmean / s, self.H / (s[:, None] * s[None, :]), self.n)


def base_linear(module: nn.Module) -> nn.Module:
    """The linear itself: a LoRA wrapper (peft) keeps it as ``base_layer``."""
    return getattr(module, "base_layer", module)


def lora_parts(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(lora_A, lora_B) linears of every adapter a peft wrapper holds (none for a plain linear)."""
    A, B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if A is None or B is None:
        return []
    return [(A[k], B[k]) for k in A.keys()]


def set_linear(layer: nn.Module, rel: str, new: nn.Module) -> None:
    """Replace the linear at ``rel`` (inside its LoRA wrapper, if it has one)."""
    mod = layer.get_submodule(rel)
    if hasattr(mod, "base_layer"):
        mod.base_layer = new
        return
    parent, _, child = rel.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, new)


@torch.no_grad()
def input_stats(layer: nn.Module, rels: Sequence[str], hidden: torch.Tensor, extra,
                keep_output: bool = False) -> tuple[dict[str, InputStats], torch.Tensor | None]:
    """Statistics of every linear's input over the windows of ``hidden``; linears that read the
    same tensor (q/k/v, gate/up) share one ``InputStats`` object. With ``keep_output`` also the
    block's output ``[n, L, d]``."""
    args, kwargs = extra
    mods = {rel: layer.get_submodule(rel) for rel in rels}
    absum: dict[str, torch.Tensor] = {}
    H: dict[str, torch.Tensor] = {}
    n: dict[str, int] = {}
    owner: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # this window's inputs, kept alive (no address reuse)

    def hook(rel):
        def f(module, a, o):
            x = a[0]
            for y, r in seen:
                if y is x:
                    owner.setdefault(rel, r)
                    return
            seen.append((x, rel))
            owner.setdefault(rel, rel)
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            if rel not in H:
                d = x2.shape[1]
                absum[rel] = torch.zeros(d, dtype=torch.float64, device=x2.device)
                H[rel] = torch.zeros(d, d, dtype=torch.float32, device=x2.device)
                n[rel] = 0
            absum[rel] += x2.abs().sum(0, dtype=torch.float64)
            H[rel].addmm_(x2.T, x2)
            n[rel] += x2.shape[0]
        return f

    handles = [m.register_forward_hook(hook(rel)) for rel, m in mods.items()]
    out = torch.empty_like(hidden) if keep_output else None
    try:
        for k in range(hidden.shape[0]):
            seen.clear()
            y = layer(hidden[k:k + 1], *args, **kwargs)
            if out is not None:
                out[k:k + 1] = y[0] if isinstance(y, (tuple, list)) else y
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    missing = [rel for rel in rels if rel not in owner]
    if missing:
        raise OtaroError(f"the calibration pass never reached {', '.join(missing)}")
    shared = {r: InputStats((absum[r] / n[r]).to(torch.float32), H[r] * (2.0 / n[r]), n[r]) for r in H}
    return {rel: shared[owner[rel]] for rel in rels}, out


# --------------------------------------------------------------------------------------------
# Scale groups: resolve, fold
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedGroup:
    """A ``ScaleGroup`` located in one decoder layer."""

    name: str  # "prev -> linears", for messages
    prev: nn.Module  # the norm, or the linear (its LoRA wrapper if it has one)
    prev_is_linear: bool
    linears: tuple[str, ...]
    rows: torch.Tensor | None  # prev output rows feeding the linears, in their input order
    norm_offset: float
    modules: list[nn.Module] = field(default_factory=list)  # the linears (wrappers if any)


def resolve_scale_groups(layer: nn.Module, adapter, config) -> tuple[list[ResolvedGroup], list[tuple[str, str]]]:
    """The adapter's scale groups that can be folded in ``layer``, and (group, reason) for the
    others. Each linear belongs to at most one group."""
    groups, skipped, taken = [], [], set()
    for g in adapter.scale_groups:
        name = f"{g.prev} -> {', '.join(g.linears)}"
        try:
            prev = layer.get_submodule(g.prev)
            mods = [layer.get_submodule(rel) for rel in g.linears]
        except AttributeError as e:
            skipped.append((name, f"no such module ({e})"))
            continue
        if not all(isinstance(base_linear(m), nn.Linear) for m in mods):
            skipped.append((name, "its readers are not all nn.Linear"))
            continue
        if taken & set(g.linears):
            skipped.append((name, "a linear is already in another group"))
            continue
        d = {base_linear(m).in_features for m in mods}
        if len(d) != 1:
            skipped.append((name, "the linears have different input widths"))
            continue
        d = d.pop()
        prev_is_linear = isinstance(base_linear(prev), nn.Linear)
        rows = None
        if prev_is_linear:
            out = base_linear(prev).out_features
            rows = torch.as_tensor(list(g.rows(config, out)) if g.rows else range(out), dtype=torch.long)
            if rows.numel() != d or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out)):
                skipped.append((name, f"{rows.numel()} output rows feed {d} inputs (grouped-query attention?)"))
                continue
        else:
            w = getattr(prev, "weight", None)
            if not isinstance(w, torch.Tensor) or w.shape != (d,):
                skipped.append((name, f"{type(prev).__name__} has no per-channel weight of size {d}"))
                continue
        taken |= set(g.linears)
        groups.append(ResolvedGroup(name, prev, prev_is_linear, tuple(g.linears), rows, g.norm_offset, mods))
    return groups, skipped


@torch.no_grad()
def fold_scales(group: ResolvedGroup, s: torch.Tensor) -> Callable[[], None]:
    """Fold s into the float model (prev / s, linears · s, LoRA factors too); returns an undo."""
    touched: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(t):
        touched.append((t, t.detach().clone()))
        return t

    s = s.to(torch.float32)
    prev = group.prev
    if group.prev_is_linear:
        r = group.rows.to(s.device)
        base = base_linear(prev)
        w = keep(base.weight.data)
        w[r] = (w[r].to(torch.float32) / s[:, None]).to(w.dtype)
        if base.bias is not None:
            b = keep(base.bias.data)
            b[r] = (b[r].to(torch.float32) / s).to(b.dtype)
        for _, B in lora_parts(prev):
            wb = keep(B.weight.data)
            wb[r] = (wb[r].to(torch.float32) / s[:, None]).to(wb.dtype)
            if getattr(B, "bias", None) is not None:
                bb = keep(B.bias.data)
                bb[r] = (bb[r].to(torch.float32) / s).to(bb.dtype)
    else:
        w = keep(prev.weight.data)
        off = group.norm_offset
        w.copy_(((w.to(torch.float32) + off) / s - off).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            b = keep(prev.bias.data)
            b.copy_((b.to(torch.float32) / s).to(b.dtype))
    for m in group.modules:
        w = keep(base_linear(m).weight.data)
        w.mul_(s[None, :].to(w.dtype))
        for A, _ in lora_parts(m):
            wa = keep(A.weight.data)
            wa.mul_(s[None, :].to(wa.dtype))

    def undo():
        for t, old in touched:
            t.copy_(old)

    return undo


class SkipLog:
    """Scale groups left unscaled, reported once per run (group, reason) with their blocks.
    Expected skips (grouped-query attention) are info; the others are warnings."""

    def __init__(self, method: str):
        self.method = method
        self.entries: dict[tuple[str, str], list[int]] = {}

    def add(self, block: int, skipped: Sequence[tuple[str, str]]) -> None:
        for name, why in skipped:
            self.entries.setdefault((name, why), []).append(block)

    def emit(self) -> None:
        for (name, why), blocks in self.entries.items():
            level = logging.INFO if "grouped-query" in why else logging.WARNING
            log.log(level, "%s: scale group %s left unscaled (clip search only) in blocks %s: %s",
                    self.method, name, ",".join(map(str, blocks)), why)


def _relative_change(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).double().norm() / ref.double().norm().clamp(min=1e-30))


# --------------------------------------------------------------------------------------------
# Single-dataset AWQ
# --------------------------------------------------------------------------------------------


def _run_block(layer, hidden, extra):
    from otaro.methods.calib import run_layer

    return run_layer(layer, hidden, extra)


@torch.no_grad()
def search_block_alpha(layer, group: ResolvedGroup, stats: InputStats, hidden, extra, ref, fmt,
                       grid: Sequence[float] = SCALE_GRID) -> tuple[float, list[float]]:
    """α minimising the decoder-layer output MSE with the group's linears fake-quantized at
    scale s(α) (the other linears stay float); returns (α, errors over the grid)."""
    bases = [base_linear(m) for m in group.modules]
    Ws = [b.weight.data.clone() for b in bases]
    errs = []
    try:
        for alpha in grid:
            s = activation_scales(stats.absmean, alpha)
            for b, W in zip(bases, Ws):
                b.weight.data.copy_((fake_quant(W.to(torch.float32) * s, fmt) / s).to(W.dtype))
            out = _run_block(layer, hidden, extra)
            errs.append(float((out - ref).double().pow(2).mean()))
    finally:
        for b, W in zip(bases, Ws):
            b.weight.data.copy_(W)
    return grid[min(range(len(grid)), key=errs.__getitem__)], errs


def search_linear_alpha(Ws: Sequence[torch.Tensor], stats: InputStats, fmt,
                        grid: Sequence[float] = SCALE_GRID) -> tuple[float, list[float]]:
    """α minimising Σ_linears tr(ΔW H ΔWᵀ), the readers' own output error, exactly from H."""
    Ws = [W.to(torch.float32) for W in Ws]
    errs = []
    for alpha in grid:
        s = activation_scales(stats.absmean, alpha)
        errs.append(sum(output_error(D, stats.H) for D in scaled_error(Ws, s, fmt)))
    return grid[min(range(len(grid)), key=errs.__getitem__)], errs


def search_windows(config, available: int) -> int:
    """How many calibration windows the α grid search runs the layer on (config.search_samples,
    at most what was drawn)."""
    n = getattr(config, "search_samples", None) or available
    return max(1, min(int(n), available))


def check_fold(layer, probes, ref_outputs) -> float:
    """Largest relative change of the block output over ``probes`` [(activate, hidden, extra)]."""
    worst = 0.0
    for (activate, hidden, extra), ref in zip(probes, ref_outputs):
        activate()
        worst = max(worst, _relative_change(_run_block(layer, hidden, extra), ref))
    return worst


@torch.no_grad()
def run_awq(model, fmt, config, calibration, progress=None):
    """The ``awq`` method: sequential block-by-block scale + clip search on --calib windows."""
    from otaro.arch import get_adapter, get_layers
    from otaro.methods.calib import capture_layer_inputs
    from otaro.modules import QuantInfo, attach

    if calibration is None:
        raise OtaroError("awq needs calibration data (--calib)")
    if fmt.family != "int":
        raise OtaroError(f"awq produces integer formats only (got {fmt.name})")
    adapter = get_adapter(model)
    if getattr(model, "otaro", None) is not None:
        raise OtaroError("model is already quantized")
    device = next(model.parameters()).device
    layers = get_layers(model, adapter)
    was_training = model.training
    model.eval()
    hidden, extra = capture_layer_inputs(model, layers, calibration.to(device))
    names: list[str] = []
    skips = SkipLog("awq")
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}"
        for rel in adapter.linear_names:
            if not isinstance(layer.get_submodule(rel), nn.Linear):
                raise OtaroError(f"{prefix}.{rel} is {type(layer.get_submodule(rel)).__name__}, expected nn.Linear")
        stats, ref = input_stats(layer, adapter.linear_names, hidden, extra[i], keep_output=True)
        groups, skipped = resolve_scale_groups(layer, adapter, model.config)
        for group in groups:
            st = stats[group.linears[0]]
            if any(stats[rel] is not st for rel in group.linears):
                skipped.append((group.name, "its linears do not read one tensor"))
                continue
            if group.prev_is_linear:
                alpha, _ = search_linear_alpha([base_linear(m).weight for m in group.modules], st, fmt)
            else:
                n = search_windows(config, hidden.shape[0])
                alpha, _ = search_block_alpha(layer, group, st, hidden[:n], extra[i], ref[:n], fmt)
            s = activation_scales(st.absmean, alpha)
            undo = fold_scales(group, s)
            change = check_fold(layer, [(lambda: None, hidden[:1], extra[i])], [ref[:1]])
            if change > FOLD_RTOL:
                undo()
                skipped.append((group.name, f"folding changes the float block output by {change:.2g} "
                                            "(the layout differs from the adapter's scale_groups)"))
                continue
            scaled = st.scaled(s)
            for rel in group.linears:
                stats[rel] = scaled
        skips.add(i, skipped)
        for rel in adapter.linear_names:
            module = quantize_clipped(layer.get_submodule(rel), stats[rel].H, fmt)
            set_linear(layer, rel, module)
            names.append(f"{prefix}.{rel}")
            if progress:
                progress(names[-1])
        attach(model, QuantInfo(fmt, adapter.name, tuple(names)))
        if i + 1 < len(layers):
            hidden = _run_block(layer, hidden, extra[i])
    skips.emit()
    model.train(was_training)
    return model


register_method(
    Method(
        "awq",
        "AWQ: activation-aware per-channel scales folded into the preceding norm/linear, then a "
        "clipping search; int formats, --calib text",
        families=("int",),
        needs_calibration=True,
        run=run_awq,
    )
)
