"""``FinetuneConfig``: every knob of a once-for-all fine-tuning run, frozen and validated.

Written as JSON beside the run state and into the final checkpoint's manifest; a resume checks
that the stored config matches (except the fields in ``RESUMABLE_CHANGES``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from otaro.errors import FormatError, OtaroError
from otaro.formats import ALL_BITS, DEFAULT_SEFP, get_format
from otaro.io import refuse_output_over_inputs

FINETUNE_CONFIG_VERSION = 1
SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
# Fields a resumed run may change without invalidating the state (they do not alter the math).
RESUMABLE_CHANGES = {"resume", "overwrite", "save_every", "eval_every", "show_progress", "ignore_memory_check"}


@dataclass(frozen=True)
class FinetuneConfig:
    model: str
    data: tuple[str, ...]
    output: str
    format: str = DEFAULT_SEFP
    bits: tuple[int, ...] = ALL_BITS
    # bit-width path
    path: str = "bps"
    segment_len: int = 16
    explore: str = "ucb"
    ucb_c: float = 1.0
    epsilon: float = 0.1
    ema: float = 0.9
    score: str = "gap"
    fixed_bits: int | None = None  # for path="fixed" (per-bit-width "model zoo" runs)
    # low-precision asynchronous accumulation
    # off by default: measured on SmolLM2 (docs/DESIGN.md §7.8) LAA raised b3/b4 KLD from both starts
    laa: bool = False
    laa_threshold: int = 4
    laa_k: int = 4
    laa_reduce: str = "mean"
    laa_scale: float = 1.0
    # optimisation
    steps: int = 200
    seq_len: int | None = None  # None: 512, or the model's maximum positions if smaller (set at load)
    batch_size: int = 8  # global batch (split across processes)
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # weight of the KL to the full-precision model's logits; 1.0 measured best at b2 and b4-8 (§7.8)
    distill: float = 1.0
    distill_temperature: float = 1.0
    # data / evaluation / state
    heldout_fraction: float = 0.05
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    resume: bool = False
    overwrite: bool = False
    ignore_memory_check: bool = False  # train even when the up-front memory estimate exceeds what is free
    # The head and embedding of the saved checkpoint (otaro.head; they are trained in float):
    # "auto" = SEFP codes with an 8-bit head, an int = that head precision, None = float.
    head_bits: int | str | None = "auto"
    # an otaro checkpoint of this model and format (e.g. multi-bit GPTQ) whose 8-bit weights the
    # master weights start from (otaro.training.init); None: the source model's float weights
    init: str | None = None
    version: int = FINETUNE_CONFIG_VERSION

    def __post_init__(self):
        if not self.data:
            raise OtaroError("give training data: --data FILE|FOLDER|corpus:NAME")
        fmt = get_format(self.format)
        if fmt.family != "sefp":
            raise FormatError(f"finetune trains SEFP formats (one model, every precision); {fmt.name} is {fmt.family}")
        from otaro.quantize import resolve_head_bits

        resolve_head_bits(self.head_bits, fmt)
        if not self.bits:
            raise FormatError("no bit-widths to train")
        for b in self.bits:
            fmt.check_bits(b)
        if self.path == "fixed":
            if self.fixed_bits is None:
                object.__setattr__(self, "fixed_bits", max(self.bits))
            fmt.check_bits(self.fixed_bits)
        positive = {"steps": self.steps, "seq_len": 2 if self.seq_len is None else self.seq_len, "batch_size": self.batch_size,
                    "segment_len": self.segment_len, "laa_k": self.laa_k, "eval_every": self.eval_every,
                    "eval_batches": self.eval_batches, "save_every": self.save_every}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise OtaroError(f"{name.replace('_', '-')} must be a positive integer (got {value!r})")
        if self.seq_len is not None and self.seq_len < 2:
            raise OtaroError("seq-len must be at least 2")
        if not self.lr > 0:
            raise OtaroError(f"learning rate must be positive (got {self.lr})")
        if self.schedule not in SCHEDULES:
            raise OtaroError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise OtaroError(f"unknown mixed precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        if self.distill < 0 or self.distill_temperature <= 0:
            raise OtaroError("distill weight must be >= 0 and its temperature > 0")
        if not 0 <= self.heldout_fraction <= 0.5:
            raise OtaroError(f"held-out fraction must be in [0, 0.5] (got {self.heldout_fraction})")
        if not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise OtaroError("min-lr-ratio must be in [0, 1]; warmup, grad-clip and weight-decay must be >= 0")
        # The checkpoint and its run folder are replaced by --overwrite: neither may be (or hold)
        # the model or the training data.
        if self.init is not None:
            from otaro.training.init import check_init_path

            check_init_path(self.init, fmt.name)
        inputs = [self.model, *(d for d in self.data if not str(d).startswith("corpus:")),
                  *([self.init] if self.init else [])]
        out = Path(self.output).resolve()
        for path in (out, out.with_name(out.name + ".run")) if out.name else (out,):
            refuse_output_over_inputs(path, inputs)

    @property
    def trained_bits(self) -> tuple[int, ...]:
        return (self.fixed_bits,) if self.path == "fixed" else tuple(sorted(self.bits))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"], d["bits"] = list(self.data), list(self.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["data"], kw["bits"] = tuple(kw["data"]), tuple(kw["bits"])
        return cls(**kw)

    def resume_mismatch(self, stored: dict) -> list[str]:
        """Fields that differ from a stored run's config and would change its result."""
        mine = self.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and stored.get(k) != mine[k])
