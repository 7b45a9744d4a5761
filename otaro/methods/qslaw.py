"""QSLAW (Xie et al., ACM MM 2024): group-wise scale factors learned on the task loss.

The layers are RTN-coded first (the format's own ``convert``); the codes stay fixed and one
factor per group scale (init 1, ``otaro.methods.qslaw_scales``) is trained on the causal-LM
loss (next-token cross-entropy) of the task data, instead of LoRA. For a LLaVA model the
multimodal projector trains too when the rows have images (text rows never run it, so on the
text data ``otaro quantize`` reads it stays as it is, and ``--qslaw-projector train`` is refused);
the vision tower, the embeddings, the head, the norms and the biases stay frozen. After training
the factors are folded into the stored scales, so the result is the packed layout ``convert``
writes, saved unchanged by ``otaro.checkpoint.save``.

* **Formats.** int: the factor multiplies each group's fp16 scale. ssfp: it multiplies the
  shared fp16 scale, so every derived bit-width b moves with it, and the loss is the multi-bit
  objective Σ_b λ_b loss_b / Σ λ_b over the target bit-widths (``--bits``; default every b with
  λ = 1) on the same batch (``MULTIBIT = "sum"``; one b per step drawn ∝ λ_b, "sample", is the
  cheaper alternative, see docs/DESIGN.md §7.21). Pow2 ``sefp-*`` rows store exponents, so
  there the factor is rounded to a power of two (whole exponent steps; ssfp is the row to use).
* **Modality-aware warmup** (``mix_schedule``): the first η steps draw task rows only; after it
  every step is task and generic text 1:1 (an odd batch alternates the extra row, so every pair
  of steps is exactly 1:1). The loss of a mixed step is the token mean over both parts, as one
  concatenated batch would give.
* **Optimizer** (the authors' HF-Trainer setup): Adam without weight decay, cosine learning
  rate with a linear warm-up over the first 3 % of the steps; factors clamped to
  ``FACTOR_RANGE`` after each step.

Entry points: ``qslaw(model, fmt, settings, task, generic)`` (any model with rows of tensors,
images included) and the registered method ``qslaw`` (``otaro quantize --method qslaw``, text
data specs read with the loaders of ``otaro finetune``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import torch

from otaro.errors import OtaroError
from otaro.formats import get_format
from otaro.methods import Method, register_method

log = logging.getLogger(__name__)
PROJECTOR_MODES = ("auto", "train", "freeze")  # auto: train the projector when the model has one
MULTIBIT_MODES = ("sum", "sample")
MULTIBIT = "sum"  # measured on a tiny model, docs/DESIGN.md §7.21
LR_WARMUP_FRACTION = 0.03  # linear LR warm-up (the released code's HF-Trainer warmup_ratio)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class QSLAWSettings:
    """What one QSLAW run trains (validated here, before any model is touched)."""

    steps: int = 200
    warmup: int = 50  # η: steps of task data only before the 1:1 task:generic mix
    lr: float = 1e-3  # peak Adam learning rate of the factors and the projector
    batch_size: int = 4  # rows per step (task + generic)
    seq_len: int = 256  # tokens per row of text data (rows given as tensors keep their length)
    seed: int = 0  # batch order of both sources (and the bit draw of MULTIBIT="sample")
    projector: str = "auto"  # a multimodal projector: auto | train | freeze
    bits: tuple[tuple[int, float], ...] = ()  # SEFP targets ((b, λ_b), ...); () = every b, λ = 1
    multibit: str = MULTIBIT

    def __post_init__(self):
        for name, flag, value in (("steps", "--qslaw-steps", self.steps), ("batch_size", "--qslaw-batch-size",
                                                                          self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OtaroError(f"{flag} must be a positive integer (got {value!r})")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise OtaroError(f"--qslaw-warmup (η) must be between 0 and --qslaw-steps = {self.steps} "
                             f"(got {self.warmup!r})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise OtaroError(f"--qslaw-lr must be a positive number (got {self.lr!r})")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise OtaroError(f"--qslaw-seq-len must be at least 2 tokens (got {self.seq_len!r})")
        if self.projector not in PROJECTOR_MODES:
            raise OtaroError(f"--qslaw-projector must be one of {', '.join(PROJECTOR_MODES)} (got {self.projector!r})")
        if self.multibit not in MULTIBIT_MODES:
            raise OtaroError(f"multibit must be one of {', '.join(MULTIBIT_MODES)} (got {self.multibit!r})")

    @property
    def needs_generic(self) -> bool:
        return self.warmup < self.steps


@dataclass(frozen=True)
class QSLAWReport:
    """What a run did (JSON-able via ``asdict``; written as qslaw.json next to a checkpoint)."""

    steps: int
    warmup: int
    task_rows: int
    generic_rows: int
    bits_drawn: dict  # b -> steps trained at b (int formats: {"fixed": steps})
    trained: tuple[str, ...]  # parameter names given to the optimizer
    groups: int  # learned factors
    moved: int  # groups whose stored scale (pow2: exponent) the fold changed
    loss_first: float  # loss of the first and of the last step (λ-weighted over b)
    loss_last: float
    losses: tuple[float, ...] = field(default=(), repr=False)


# --------------------------------------------------------------------------------------------
# Schedules (pure)
# --------------------------------------------------------------------------------------------


def mix_schedule(steps: int, warmup: int, batch_size: int) -> list[tuple[int, int]]:
    """(task rows, generic rows) of every step: task only for the first ``warmup`` steps, then
    1:1; with an odd batch the extra row alternates, generic first on the odd mixed steps."""
    plan = []
    for s in range(steps):
        generic = 0 if s < warmup else (batch_size + (s - warmup) % 2) // 2
        plan.append((batch_size - generic, generic))
    return plan


def bit_schedule(targets: Sequence[tuple[int | None, float]], steps: int, mode: str = MULTIBIT,
                 seed: int = 0) -> list[tuple[tuple[int | None, float], ...]]:
    """((b, weight), ...) per step. "sum": every target each step, weights λ_b / Σ λ; "sample":
    one b per step, drawn with probability ∝ λ_b (seeded), weight 1."""
    total = float(sum(w for _, w in targets))
    if mode == "sum" or len(targets) == 1:
        step = tuple((b, float(w) / total) for b, w in targets)
        return [step] * steps
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([float(w) for _, w in targets], dtype=torch.float64)
    draws = torch.multinomial(probs, steps, replacement=True, generator=gen).tolist()
    return [((targets[i][0], 1.0),) for i in draws]


def lr_at(step: int, steps: int, lr: float, warm_fraction: float = LR_WARMUP_FRACTION) -> float:
    """Linear warm-up over ``ceil(warm_fraction · steps)`` steps, then cosine to 0 at the end."""
    warm = math.ceil(warm_fraction * steps)
    if step < warm:
        return lr * (step + 1) / warm
    rest = max(1, steps - warm)
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / rest))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class RowSource:
    """An endless, seeded draw of rows from equal-length tensors (``input_ids`` and ``labels``,
    plus e.g. ``pixel_values``, one image per row): ``otaro finetune``'s BatchOrder over rows."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], seed: int = 0, name: str = "task"):
        from otaro.training.data import BatchOrder

        self.name = name
        self.tensors = dict(tensors)
        if "input_ids" not in self.tensors:
            raise OtaroError(f"qslaw {name} rows need input_ids")
        self.tensors.setdefault("labels", self.tensors["input_ids"])
        n = {len(t) for t in self.tensors.values()}
        if len(n) != 1:
            raise OtaroError(f"qslaw {name} tensors have different numbers of rows: {sorted(n)}")
        self.order = BatchOrder(n.pop(), 1, seed)

    @property
    def has_images(self) -> bool:
        return "pixel_values" in self.tensors

    def take(self, k: int) -> dict[str, torch.Tensor]:
        idx = [self.order.next_global_batch()[0] for _ in range(k)]
        return {key: t[idx] for key, t in self.tensors.items()}


def text_rows(tokenizer, specs: Sequence[str], seq_len: int, name: str, max_positions: int | None = None):
    """Packed ``seq_len`` blocks of data specs (as ``otaro finetune`` reads them: prompt tokens
    of prompt/response examples carry label -100)."""
    from otaro.training.data import load_examples, pack

    if tokenizer is None:
        raise OtaroError("the model has no tokenizer to read the qslaw data with")
    if tokenizer.eos_token_id is None:
        raise OtaroError("the tokenizer has no end-of-sequence token to separate qslaw examples")
    if max_positions is not None and seq_len > max_positions:
        raise OtaroError(f"--qslaw-seq-len {seq_len} is larger than the model allows ({max_positions})")
    blocks = pack(tokenizer, load_examples(list(specs)), seq_len, tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise OtaroError(f"qslaw {name} data too small for one block of {seq_len} tokens; "
                         "lower --qslaw-seq-len or add data")
    return {"input_ids": blocks.input_ids, "labels": blocks.labels}


def _source(rows, seed: int, name: str) -> RowSource | None:
    if rows is None or isinstance(rows, RowSource):
        return rows
    return RowSource(rows, seed, name)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _targets(fmt, settings: QSLAWSettings) -> list[tuple[int | None, float]]:
    if fmt.family != "sefp":
        return [(None, 1.0)]
    from otaro.methods.sefp_quantizer import target_weights

    return [(int(b), float(w)) for b, w in target_weights(fmt, settings)]


def _targets_of(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_sum(model, batch: dict, device) -> torch.Tensor:
    """Summed next-token CE of a batch (the model's own loss, a mean, times its target count)."""
    inputs = {k: v.to(device) for k, v in batch.items()}
    out = model(**inputs, use_cache=False)
    return out.loss * _targets_of(batch)


def _projector_params(model, parts, mode: str, images: bool) -> list:
    if mode == "train" and parts is None:
        raise OtaroError(f"--qslaw-projector train: {type(model).__name__} is a text-only model with no multimodal "
                         "projector to train; drop the option")
    if parts is None or mode == "freeze":
        return []
    if not images:  # text rows never run the projector: it would get no gradient
        if mode == "train":
            raise OtaroError("--qslaw-projector train: the qslaw data has no images, so the projector never runs and "
                             "gets no gradient; train it on image rows (the Python API) or drop the option")
        return []
    return list(model.get_submodule(parts.projector).named_parameters(prefix=parts.projector))


def qslaw(model, fmt, settings: QSLAWSettings, task, generic=None, progress=None) -> QSLAWReport:
    """Quantize ``model`` in place (RTN codes, learned scales folded in); returns the report.

    ``task`` / ``generic``: a ``RowSource`` or a mapping of row tensors (``input_ids``,
    ``labels`` with -100 on untrained positions, ``pixel_values`` for image rows).
    ``progress(name)`` is called after each converted layer; the steps report through
    ``otaro.progress`` when it is given."""
    from otaro.arch.multimodal import multimodal_parts
    from otaro.methods.qslaw_scales import check_scale_kind, install, uninstall
    from otaro.modules import convert, set_precision

    fmt = get_format(fmt)
    check_scale_kind(fmt)
    if getattr(model, "otaro", None) is not None:
        raise OtaroError("model is already quantized; qslaw starts from the float model")
    parts = multimodal_parts(model)
    task = _source(task, settings.seed, "task")
    generic = _source(generic, settings.seed + 1, "generic")
    images = any(s is not None and s.has_images for s in (task, generic))
    projector = _projector_params(model, parts, settings.projector, images)
    if task is None:
        raise OtaroError("qslaw needs task data: --qslaw-data SPEC")
    if settings.needs_generic and generic is None:
        raise OtaroError(f"qslaw mixes generic text 1:1 after the warmup (η = {settings.warmup} < "
                         f"{settings.steps} steps): give --qslaw-generic SPEC, or set --qslaw-warmup to the step count")
    if parts is None and images:
        raise OtaroError(f"the qslaw data has images but {type(model).__name__} is a text-only model")
    targets = _targets(fmt, settings)
    plan = mix_schedule(settings.steps, settings.warmup, settings.batch_size)
    bit_plan = bit_schedule(targets, settings.steps, settings.multibit, settings.seed)

    convert(model, fmt, packed=True, progress=progress)
    wrappers = install(model, model.otaro.layers)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [(f"{n}.factor", w.factor) for n, w in wrappers.items()] + projector
    for _, p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam([p for _, p in trained], lr=settings.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.train()
    if parts is not None:
        model.get_submodule(parts.vision).eval()  # frozen: no dropout / batch statistics either
    losses: list[float] = []
    bits_drawn: dict = {}
    ok = False
    try:
        # callers may hold no_grad (as benchmarks do around method.run): the steps need autograd
        with _bar(progress, settings.steps) as bar, torch.enable_grad():
            for step, ((n_task, n_generic), bits_step) in enumerate(zip(plan, bit_plan)):
                batches = [b for b in (task.take(n_task) if n_task else None,
                                       generic.take(n_generic) if n_generic else None) if b is not None]
                count = sum(_targets_of(b) for b in batches)
                if count == 0:
                    raise OtaroError(f"qslaw step {step}: the batch has no trained tokens (all labels are -100)")
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, settings.steps, settings.lr)
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for bits, weight in bits_step:
                    if bits is not None:
                        set_precision(model, bits)
                    key = "fixed" if bits is None else str(bits)
                    bits_drawn[key] = bits_drawn.get(key, 0) + 1
                    for b in batches:  # a backward per part: one part's graph is held at a time
                        loss = _loss_sum(model, b, device) * (weight / count)
                        loss.backward()
                        step_loss += float(loss.detach())
                opt.step()
                for w in wrappers.values():
                    w.clamp_()
                if not math.isfinite(step_loss):
                    raise OtaroError(f"qslaw loss is not finite at step {step}; lower --qslaw-lr")
                losses.append(step_loss)
                bar.set_postfix_str(f"loss {step_loss:.4f}")
                bar.update(1)
        moved = sum(int((w.folded() != w._scale).sum()) for w in wrappers.values())
        ok = True
    finally:
        uninstall(model, wrappers, fold=ok)  # interrupted: the plain RTN layers go back
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)
    if fmt.family == "sefp":
        set_precision(model, fmt.top_bits)
    if moved == 0:
        log.warning("qslaw: no group scale changed (pow2 exponents move only once a factor passes 2^±0.5); "
                    "use an ssfp row or a higher --qslaw-lr")
    return QSLAWReport(
        steps=settings.steps, warmup=settings.warmup, task_rows=sum(t for t, _ in plan),
        generic_rows=sum(g for _, g in plan),
        bits_drawn=dict(sorted(bits_drawn.items(), key=lambda kv: (len(kv[0]), kv[0]))),  # "3" < "4" < "8"
        trained=tuple(n for n, _ in trained), groups=sum(w.factor.numel() for w in wrappers.values()), moved=moved,
        loss_first=losses[0], loss_last=losses[-1], losses=tuple(losses),
    )


def _bar(progress, total: int):
    from otaro.progress import progress as make_bar

    return make_bar(total=total, desc="qslaw", unit="step", enabled=progress is not None)


@torch.no_grad()
def mean_loss(model, rows: Mapping[str, torch.Tensor], batch_size: int = 8) -> float:
    """Token-mean next-token CE of ``model`` over all ``rows`` (no training)."""
    device = next(model.parameters()).device
    n = len(rows["input_ids"])
    total, count = 0.0, 0
    was = model.training
    model.eval()
    try:
        for i in range(0, n, batch_size):
            batch = {k: v[i : i + batch_size] for k, v in rows.items()}
            batch.setdefault("labels", batch["input_ids"])
            total += float(_loss_sum(model, batch, device))
            count += _targets_of(batch)
    finally:
        model.train(was)
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------
# The registered method (otaro quantize --method qslaw)
# --------------------------------------------------------------------------------------------

# QuantizeConfig field -> the QSLAWSettings field it sets (the CLI flag is --qslaw-<field>).
CONFIG_FIELDS = {"qslaw_steps": "steps", "qslaw_warmup": "warmup", "qslaw_lr": "lr",
                 "qslaw_batch_size": "batch_size", "qslaw_seq_len": "seq_len", "qslaw_projector": "projector"}


def settings_of(config) -> QSLAWSettings:
    """The QSLAWSettings a QuantizeConfig asks for (its calib_seed seeds the batch order)."""
    kw = {dst: getattr(config, src) for src, dst in CONFIG_FIELDS.items()}
    return QSLAWSettings(**kw, seed=int(getattr(config, "calib_seed", 0)), bits=tuple(getattr(config, "bits", ())))


def check_qslaw_config(config, method) -> None:
    """QuantizeConfig's QSLAW part: the options are valid and the data exist (qslaw), or none of
    them is given (every other method). Normalizes the data specs to tuples."""
    from dataclasses import fields

    from otaro.io import refuse_output_over_inputs

    for name in ("qslaw_data", "qslaw_generic"):
        value = getattr(config, name)
        value = (value,) if isinstance(value, str) else tuple(value)
        object.__setattr__(config, name, tuple(part for v in value for part in str(v).split(",") if part))
    if method.name != "qslaw":
        defaults = {f.name: f.default for f in fields(config) if f.name.startswith("qslaw_")}
        given = [n for n, d in defaults.items() if getattr(config, n) != d]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise OtaroError(f"{flags}: only --method qslaw uses these options")
        return
    fmt = get_format(config.format)
    from otaro.methods.qslaw_scales import check_scale_kind

    check_scale_kind(fmt)
    settings = settings_of(config)  # validates steps, η, lr, batch, seq len, projector
    from otaro.methods.calib import check_calibration_specs

    if not config.qslaw_data:
        raise OtaroError("qslaw needs task data: --qslaw-data FILE|FOLDER|corpus:NAME")
    check_calibration_specs(config.qslaw_data + config.qslaw_generic)  # a missing file, an unknown type
    if settings.needs_generic and not config.qslaw_generic:
        raise OtaroError(f"qslaw mixes generic text 1:1 after the warmup (η = {settings.warmup} < "
                         f"{settings.steps} steps): give --qslaw-generic SPEC, or set --qslaw-warmup to the step count")
    refuse_output_over_inputs(config.output, [s for s in config.qslaw_data + config.qslaw_generic
                                              if not s.startswith("corpus:")])


def read_qslaw_data(src, config) -> dict:
    """Both data sets as packed rows, tokenized with the model's tokenizer (before any work)."""
    settings = settings_of(config)
    from otaro.sources import max_positions

    max_pos = max_positions(src.model.config)  # a LLaVA's: its language model's
    rows = {"task": text_rows(src.tokenizer, config.qslaw_data, settings.seq_len, "task", max_pos)}
    if settings.needs_generic:
        rows["generic"] = text_rows(src.tokenizer, config.qslaw_generic, settings.seq_len, "generic", max_pos)
    return rows


def run_qslaw(model, fmt, config, calibration=None, progress=None):
    """``calibration``: what ``read_qslaw_data`` read, or bare token windows ``[n, L]`` (the
    calibration of the other methods' drivers), which are then the task data, with no generic
    text: η becomes the step count (task data only), with a warning."""
    settings = settings_of(config) if config is not None else QSLAWSettings()
    if isinstance(calibration, torch.Tensor):
        calibration = {"task": {"input_ids": calibration}}
        if settings.needs_generic:
            log.warning("qslaw got token windows and no generic text: training on task data only")
            settings = replace(settings, warmup=settings.steps)
    if not calibration or "task" not in calibration:
        raise OtaroError("qslaw needs task data: --qslaw-data FILE|FOLDER|corpus:NAME")
    report = qslaw(model, fmt, settings, calibration["task"], calibration.get("generic"), progress)
    model.otaro_qslaw = report
    return model


def save_report(model, path) -> None:
    """qslaw.json next to the checkpoint: the schedule's counts and the loss of every step."""
    from otaro.io import write_json

    report = getattr(model, "otaro_qslaw", None)
    if report is not None:
        write_json(path / "qslaw.json", {**asdict(report), "losses": list(report.losses)})


register_method(
    Method(
        "qslaw",
        "QSLAW: RTN codes kept, one learned factor per group scale trained on the task loss "
        "(--qslaw-data; after --qslaw-warmup steps mixed 1:1 with --qslaw-generic text); int and ssfp "
        "(pow2 sefp: factors rounded to powers of two)",
        families=("int", "sefp"),
        needs_calibration=False,
        run=run_qslaw,
        target_bits=True,
        after_save=save_report,
        read_data=read_qslaw_data,
    )
)
