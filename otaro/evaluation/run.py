"""``otaro eval``: quality per bit-width of a checkpoint or of a model quantized on the fly:
perplexity and bits/byte, and fidelity to an unquantized reference (mean and 99th-percentile
KL(P_ref || P_q) per token, top-1 agreement) from the same forward passes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import platform
import time
from dataclasses import asdict, dataclass

import torch

from otaro.errors import FormatError, OtaroError
from otaro.formats import ALL_BITS, get_format

EVAL_CONFIG_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    model: str
    texts: tuple[str, ...]
    bits: tuple[int, ...] = ALL_BITS
    formats: tuple[str, ...] = ()  # quantize an unquantized model on the fly (RTN) in these formats
    baseline: bool = True  # also score the unquantized model (when it is not a checkpoint)
    seq_len: int | None = None  # None: 512, or the model's maximum positions if smaller
    max_windows: int | None = 40
    batch_size: int = 1
    threads: int | None = None
    reference: str | None = None  # KLD/top-1 reference; None: the source model (see evaluation.reference)
    use_reference: bool = True  # False: skip KLD/top-1
    # With --format: the head and embedding of the on-the-fly model, as `otaro quantize --head-bits`
    # stores them ("auto": 8-bit SEFP head for SEFP formats, float for int; None: float).
    # A checkpoint is evaluated as it is stored.
    head_bits: int | str | None = "auto"
    version: int = EVAL_CONFIG_VERSION

    def __post_init__(self):
        if not self.texts:
            raise OtaroError("give at least one text: --text FILE or --corpus NAME")
        for f in self.formats:
            get_format(f)
        if self.seq_len is not None and self.seq_len < 2:
            raise OtaroError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.max_windows is not None and self.max_windows < 1:
            raise OtaroError(f"--max-windows must be positive (got {self.max_windows})")
        if self.batch_size < 1:
            raise OtaroError(f"--batch-size must be positive (got {self.batch_size})")
        if self.reference is not None and not self.use_reference:
            raise OtaroError("--reference and --no-reference contradict each other")
        from otaro.quantize import resolve_head_bits

        if self.head_bits != "auto":
            for f in self.formats:
                resolve_head_bits(self.head_bits, get_format(f))


def series_label(fmt) -> str:
    """Label that lines up one format's rows across bit-widths (int rows: one format per b)."""
    if fmt.family == "int":
        return f"int-g{fmt.group_size}-{'sym' if fmt.symmetric else 'asym'}"
    return fmt.name


def _plan(model, src_kind: str, cfg: EvalConfig):
    """[(label, format or None, bits or None, bits_per_weight)] to score, validated up front."""
    rows = []
    if src_kind == "checkpoint":
        if cfg.formats:
            raise OtaroError("--format applies to unquantized models; this checkpoint already has one")
        fmts = [model.otaro.fmt]
    else:
        if cfg.baseline or not cfg.formats:
            rows.append(("fp32", None, None, 32.0))
        fmts = [get_format(f) for f in cfg.formats]
    for fmt in fmts:
        allowed = fmt.bits if isinstance(fmt.bits, tuple) else (fmt.bits,)
        bits = [b for b in cfg.bits if b in allowed]
        if not bits and len(fmts) == 1:
            raise FormatError(f"{fmt.name} carries bit-widths {list(allowed)}, none of {list(cfg.bits)}")
        rows += [(series_label(fmt), fmt, b, fmt.bits_per_weight(b)) for b in bits]
    return rows


def _row(w, label, fmt, bits, bpw, s) -> dict:
    return {
        "dataset": w.name, "label": label, "format": None if fmt is None else fmt.name, "bits": bits,
        "bits_per_weight": bpw, "ppl": s.ppl, "bpb": s.bpb, "tokens": s.tokens, "bytes": s.bytes,
        "kld": s.kld, "kld_p99": s.kld_p99, "top1": s.top1, "bos": w.bos_id is not None,
    }


def run_eval(cfg: EvalConfig, show_progress: bool = True) -> dict:
    from otaro.evaluation import reference as refs
    from otaro.evaluation.data import make_windows, read_text
    from otaro.evaluation.metrics import score
    from otaro.head import quantize_head
    from otaro.modules import convert, set_precision
    from otaro.progress import progress
    from otaro.quantize import resolve_head_bits
    from otaro.sources import fit_seq_len, load_source, max_positions
    from otaro.tokens import leading_bos

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    texts = [read_text(t) for t in cfg.texts]  # fail on a bad text before loading a model
    src = load_source(cfg.model)
    if src.tokenizer is None:
        raise OtaroError(f"{cfg.model} has no tokenizer; evaluation needs one")
    max_pos = max_positions(src.model.config)  # a multimodal wrapper's: its language model's
    seq_len = fit_seq_len(cfg.seq_len, src.model.config)
    if cfg.seq_len is None and leading_bos(src.tokenizer) is not None and max_pos and seq_len >= max_pos:
        seq_len = int(max_pos) - 1  # the default window leaves the model's BOS a position
    cfg = dataclasses.replace(cfg, seq_len=seq_len)  # recorded as used
    plan = _plan(src.model, src.kind, cfg)
    windows = [make_windows(src.tokenizer, text, cfg.seq_len, cfg.max_windows, label, max_pos) for label, text in texts]
    # a reference that does not fit fails here, before any window is scored
    ref = refs.resolve(cfg.reference, cfg.use_reference, src, cfg.model)
    rows = []
    # the fp32 row of a self-referenced model is the reference pass itself: not scored twice
    reuse_fp32 = ref.is_self and any(fmt is None for _, fmt, _, _ in plan)
    passes = len(plan) + (ref.model is not None) - reuse_fp32
    total = passes * sum(len(w.tokens) for w in windows)
    t0 = time.perf_counter()
    models: dict = {}  # format name -> converted model (the source model itself for a checkpoint)
    with contextlib.ExitStack() as stack, \
            progress(total=total, desc="eval", unit="win", enabled=show_progress) as bar:
        cache, ref_scores = None, None
        if ref.model is not None:
            bar.set_postfix_str(f"reference {ref.name}")
            cache, ref_scores = refs.compute(ref.model, windows, cfg.batch_size, bar.update)
            stack.callback(cache.close)
            ref = dataclasses.replace(ref, model=None)  # a separate reference model is not needed any more
        for label, fmt, bits, bpw in plan:
            if fmt is None and reuse_fp32:
                for w, s in zip(windows, ref_scores):
                    rows.append(_row(w, label, fmt, bits, bpw, dataclasses.replace(s, kld=0.0, kld_p99=0.0, top1=1.0)))
                continue
            model = src.model
            if fmt is not None and src.kind != "checkpoint":
                if fmt.name not in models:
                    models.clear()  # keep at most one quantized copy in memory
                    models[fmt.name] = convert(copy.deepcopy(src.model), fmt, packed=True)
                    head_bits = resolve_head_bits(cfg.head_bits, fmt)
                    if head_bits is not None:
                        quantize_head(models[fmt.name], head_bits)
                model = models[fmt.name]
            if fmt is not None and fmt.family == "sefp":
                set_precision(model, bits)
            bar.set_postfix_str(f"{label} b={bits or '-'}")
            for i, w in enumerate(windows):
                s = score(model, w, cfg.batch_size, progress=bar.update, reference=None if cache is None else cache[i])
                rows.append(_row(w, label, fmt, bits, bpw, s))
    fmt_names = sorted({r["format"] for r in rows if r["format"]})
    return {
        "otaro_eval": EVAL_CONFIG_VERSION,
        "config": asdict(cfg),
        "model": {"name": src.name, "kind": src.kind, "arch": src.model.config.model_type, "formats": fmt_names},
        # bos: every window was read after the model's BOS (not scored; same windows and targets)
        "bos": any(w.bos_id is not None for w in windows),
        "windows": {w.name: {"count": len(w.tokens), "seq_len": cfg.seq_len, "text_tokens": w.total_tokens,
                             "bos": w.bos_id is not None} for w in windows},
        "reference": {
            "model": ref.name, "origin": ref.origin, "note": ref.note,
            "ppl": None if ref_scores is None else {w.name: s.ppl for w, s in zip(windows, ref_scores)},
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 2),
        "machine": machine_info(),
    }


def machine_info() -> dict:
    import os

    import transformers

    from otaro import __version__

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "otaro": __version__,
    }
