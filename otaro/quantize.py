"""``otaro quantize``: load a model, apply a registered method, write a checkpoint."""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from otaro.errors import FormatError, OtaroError
from otaro.formats import DEFAULT_SEFP, get_format, parse_bit_weights
from otaro.io import refuse_output_over_inputs

log = logging.getLogger(__name__)

QUANTIZE_CONFIG_VERSION = 2  # 2: calibration and GPTQ fields
# --save-format -> the module whose save(model, path, tokenizer=, overwrite=, extra=) writes it
# (and, optionally, check_model(model, fmt, method) that refuses a model before any work).
SAVE_FORMATS = {"otaro": "otaro.checkpoint", "hf": "otaro.hf"}


@dataclass(frozen=True)
class QuantizeConfig:
    model: str
    output: str
    method: str = "rtn"
    format: str = DEFAULT_SEFP
    overwrite: bool = False
    # Calibration (methods with needs_calibration): data specs as for finetune (.txt, .jsonl,
    # folder, saved dataset, corpus:NAME), windows drawn with a seeded generator.
    calib: tuple[str, ...] = ()
    calib_samples: int = 128
    calib_len: int = 512
    calib_seed: int = 0
    # Target bit-widths with weights λ_b, ((bits, λ_b), ...) as parse_bit_weights returns them;
    # a spec string ("3:1,4:1,8:1") is accepted and normalized. Empty = the format's own:
    # every SEFP bit-width with weight 1, or the int format's one bit-width.
    bits: tuple[tuple[int, float], ...] = ()
    # GPTQ. With act_order the groups are static (parameters fixed from the unpermuted W), so
    # g_idx is the plain column // G and the checkpoint layout is RTN's: nothing extra stored.
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    # SEFP multi-bit methods (mbrtn, gptq): search each group's shared scale (pow2: E or E-1;
    # fp16: a clipping grid) on the same λ-weighted error.
    scale_search: bool = True
    # AWQ: calibration windows its α grid search runs the decoder layer on (the first ones of the
    # seeded draw). The search is 20 layer forwards per norm-fed group, ~95% of AWQ's time on a
    # CPU; the statistics, the clipping search and the next layer's inputs use every window.
    search_samples: int = 8
    # What is written: "otaro" (checkpoint folder + otaro.json) or "hf" (a Hugging Face folder
    # in the layout of the method: rtn/gptq -> GPTQ v1, awq -> AWQ GEMM; int formats only, otaro.hf).
    save_format: str = "otaro"
    # Multi-task methods (mlgptq, mlawq, gptq-pooled, awq-pooled; otaro.methods.multitask): one
    # (name, PEFT LoRA folder, calibration data specs) per task, "NAME=ADAPTER:DATA" strings
    # accepted; calib_samples/calib_len/calib_seed apply to each task. task_stats: a folder
    # keeping each task's statistics, so adding a task does not re-collect the others.
    tasks: tuple = ()
    task_stats: str | None = None
    # mlgptq/mlawq: how the per-task Hessians are combined (multitask.HESSIAN_COMBINATIONS):
    # "diag-max" pooled correlations with the per-channel max diagonal, "max-psd" the element-wise
    # max projected onto the PSD cone, "max" the literal max (often not PSD: GPTQ then raises its
    # damping). diag-max is the one that beat pooled GPTQ in benchmarks/int_ptq.py's two tasks.
    ml_hessian: str = "diag-max"
    # The LM head and the embedding (otaro.head): "auto" = SEFP codes with the head at 8 bits for
    # SEFP formats, float for integer formats (their layouts have no quantized head); an int
    # 2-8 = that head precision (SEFP formats only); None = float (the model's dtype).
    head_bits: int | str | None = "auto"
    # QSLAW (otaro.methods.qslaw; every other method refuses these when changed from the default).
    qslaw_data: tuple[str, ...] = ()  # task data specs (as --calib) the scale factors are trained on
    qslaw_generic: tuple[str, ...] = ()  # generic text mixed 1:1 with the task data after the warmup
    qslaw_steps: int = 200  # optimizer steps
    qslaw_warmup: int = 50  # η: the first steps draw task data only (0..qslaw_steps)
    qslaw_lr: float = 1e-3  # peak Adam learning rate (3 % linear warm-up, then cosine)
    qslaw_batch_size: int = 4  # rows per step (task + generic)
    qslaw_seq_len: int = 256  # tokens per row
    qslaw_projector: str = "auto"  # multimodal projector: auto (train it on image rows), train, freeze
    # Block reconstruction: sb/la/mb (SignRound, seed 001) and lsi (seed 004), otaro.methods.recon;
    # None = the method's default (recon.settings.DEFAULTS), resolved here so the manifest has it.
    # Other methods refuse these when changed from the default.
    recon_blocks: int | None = None  # n of LA-n / MB-n: blocks per window (sb and lsi: 1; la/mb: 2)
    recon_iters: int | None = None  # sb/la/mb: SignSGD steps per window (200)
    recon_lr: float | None = None  # learning rate (sb/la/mb: 1/recon_iters; lsi: AdamW 2e-4)
    recon_batch: int | None = None  # calibration windows per step (sb/la/mb: 8; lsi: 1, as OmniQuant)
    lsi_epochs: int = 2  # lsi: passes over the calibration windows per block
    lsi_k: int = 0  # lsi: size of the dense k×k increment on the leading singular values (0 = none)
    version: int = QUANTIZE_CONFIG_VERSION

    def __post_init__(self):
        from otaro.methods import get_method

        fmt = get_format(self.format)
        method = get_method(self.method)
        if fmt.family not in method.families:
            raise FormatError(f"method {self.method} cannot produce {fmt.family} formats ({fmt.name})")
        calib = (self.calib,) if isinstance(self.calib, str) else tuple(self.calib)
        object.__setattr__(self, "calib", calib)
        if method.multi_task or self.tasks or self.task_stats:
            from otaro.methods.multitask import check_task_config

            object.__setattr__(self, "tasks", check_task_config(self, method))  # raises unless multi-task
        elif method.needs_calibration:
            self._check_calibration()
        elif calib:
            raise OtaroError(f"method {self.method} uses no calibration data; drop --calib")
        if method.target_bits:
            object.__setattr__(self, "bits", self._target_bits(fmt))
        elif self.bits:
            raise OtaroError(f"method {self.method} has no target bit-widths; drop --bits")
        if not 0 < self.damp <= 1:
            raise OtaroError(f"--damp must be in (0, 1] (a fraction of the mean Hessian diagonal), got {self.damp}")
        if self.block_size < 1:
            raise OtaroError(f"--block-size must be at least 1 (got {self.block_size})")
        from otaro.methods.multitask import ML_HESSIANS

        if self.ml_hessian not in ML_HESSIANS:
            raise OtaroError(f"--ml-hessian must be one of {', '.join(ML_HESSIANS)} (got {self.ml_hessian!r})")
        if self.search_samples < 1:
            raise OtaroError(f"--search-samples must be at least 1 (got {self.search_samples})")
        from otaro.methods.qslaw import check_qslaw_config

        check_qslaw_config(self, method)  # QSLAW's options and data, or none of them for other methods
        from otaro.methods.recon.settings import resolve_recon_options

        for key, value in resolve_recon_options(self).items():  # checks, then sb/la/mb/lsi defaults
            object.__setattr__(self, key, value)
        self._check_save_format(fmt)
        resolve_head_bits(self.head_bits, fmt)
        out = Path(self.output)
        # Before "already exists": with --overwrite it would replace (delete) the model or calibration text.
        refuse_output_over_inputs(out, [self.model, *(c for c in calib if not c.startswith("corpus:"))])
        if out.exists() and not self.overwrite:
            raise OtaroError(f"output folder {out} already exists (pass --overwrite to replace it)")

    def _check_save_format(self, fmt) -> None:
        if self.save_format not in SAVE_FORMATS:
            raise OtaroError(f"--save-format must be one of {', '.join(SAVE_FORMATS)} (got {self.save_format!r})")
        if self.save_format == "hf":
            from otaro.hf import layout_for_method
            from otaro.hf.layouts import check_format

            # int formats only, and the method's layout must hold the bit-width (AWQ: 4 only)
            check_format(layout_for_method(self.method), fmt)

    def _check_calibration(self):
        from otaro.methods.calib import check_calibration_specs

        if not self.calib:
            raise OtaroError(f"method {self.method} needs calibration data: --calib FILE|FOLDER|corpus:NAME")
        if self.calib_samples < 1:
            raise OtaroError(f"--calib-samples must be at least 1 (got {self.calib_samples})")
        if self.calib_len < 2:
            raise OtaroError(f"--calib-len must be at least 2 tokens (got {self.calib_len})")
        check_calibration_specs(self.calib)

    def _target_bits(self, fmt) -> tuple[tuple[int, float], ...]:
        if fmt.family == "int":
            # One stored precision: --bits may only repeat it (a weight means nothing alone).
            if self.bits:
                given = parse_bit_weights(self.bits)
                if [b for b, _ in given] != [fmt.bits]:
                    raise FormatError(f"{fmt.name} holds {fmt.bits}-bit weights only; --bits must be absent "
                                      f"or {fmt.bits} (got {', '.join(str(b) for b, _ in given)})")
            return ((fmt.bits, 1.0),)
        if not self.bits:
            return tuple((b, 1.0) for b in fmt.bits)
        try:
            return parse_bit_weights(self.bits, allowed=fmt.bits)
        except FormatError as e:
            raise FormatError(f"--bits for {fmt.name}: {e}") from None


def resolve_head_bits(head_bits, fmt) -> int | None:
    """The head precision a config's ``head_bits`` means for ``fmt`` (see QuantizeConfig)."""
    from otaro.head import default_head_bits

    if head_bits == "auto":
        return default_head_bits(fmt) if fmt.family == "sefp" else None
    if head_bits is None or head_bits == "float":
        return None
    if isinstance(head_bits, bool) or not isinstance(head_bits, int):
        raise OtaroError(f"--head-bits must be auto, float or a bit-width 2-8 (got {head_bits!r})")
    if fmt.family != "sefp":
        raise FormatError(f"--head-bits {head_bits}: the head is stored as SEFP, and {fmt.name} is an integer "
                          f"format (its layouts keep a float head); drop --head-bits")
    fmt.check_bits(head_bits)
    return head_bits


def warn_untargeted_top(config: QuantizeConfig, fmt, method) -> bool:
    """A multi-bit SEFP run whose targets leave out the top precision tunes the one stored code
    for the low ones only: measured on SmolLM2 (benchmarks/recon_bench.py, gptq with --bits
    3:1,4:1), b = 8 then lost most of its fidelity (KLD to fp32 0.71 against RTN's 0.002). Say
    so before the work; it is a valid choice (a model read only at 3-4 bits)."""
    if fmt.family != "sefp" or not method.target_bits or not config.bits:
        return False
    top, targets = max(fmt.bits), sorted(b for b, _ in config.bits)
    if top in targets:
        return False
    log.warning("--bits %s leaves out b = %d: the stored %d-bit code is tuned for %s only and b = %d can be far "
                "worse than RTN; add %d:1 (e.g. --bits %s,%d:1) to keep it", ",".join(map(str, targets)), top,
                top, "/".join(map(str, targets)), top, top, ",".join(f"{b}:{w:g}" for b, w in config.bits), top)
    return True


def check_multimodal(config: QuantizeConfig, model_type: str | None) -> None:
    """A multimodal wrapper (LLaVA, ``otaro.arch.multimodal``) is quantized by every single-task
    method (the language model's linears; the vision tower and the projector kept float) into an
    otaro checkpoint; the multi-task methods and HF layouts are one OtaroError line. A no-op for
    a text model (``model_type`` None: a tiny model or an alias)."""
    from otaro.arch.multimodal import refuse_multimodal
    from otaro.methods import get_method

    if get_method(config.method).multi_task:
        refuse_multimodal(model_type, f"--method {config.method}",
                          "its task LoRA adapters name a text model's layers; use a single-task method")
    if config.save_format != "otaro":
        refuse_multimodal(model_type, f"--save-format {config.save_format}",
                          "its GPTQ/AWQ folders hold causal LMs only; write an otaro checkpoint (--save-format otaro)")


def quantize(config: QuantizeConfig, progress=None) -> Path:
    """Run the method and save the checkpoint; returns the output folder."""
    from otaro.methods import get_method
    from otaro.io import check_writable_output
    from otaro.sources import load_source, max_positions, model_type_of

    check_multimodal(config, model_type_of(config.model))  # read from config.json, before any weight loads
    check_writable_output(config.output)  # a read-only or blocked output fails now, not after the work
    src = load_source(config.model)
    if src.kind == "checkpoint":
        raise OtaroError(f"{config.model} is already quantized; quantize the original model")
    fmt = get_format(config.format)
    method = get_method(config.method)
    saver = importlib.import_module(SAVE_FORMATS[config.save_format])
    warn_untargeted_top(config, fmt, method)
    if hasattr(saver, "check_model"):  # e.g. the HF layouts' shape rules, before any calibration
        saver.check_model(src.model, fmt, method.name)
    calibration = None
    if method.needs_calibration:
        from otaro.methods.calib import calibration_windows

        # Built (and checked: enough tokens, length within the model's positions) before any
        # layer is touched.
        max_pos = max_positions(src.model.config)
        if method.multi_task:  # task name -> its windows
            calibration = {t.name: calibration_windows(src.tokenizer, t.data, config.calib_samples, config.calib_len,
                                                       seed=config.calib_seed, max_positions=max_pos)
                           for t in config.tasks}
        else:
            calibration = calibration_windows(src.tokenizer, config.calib, config.calib_samples, config.calib_len,
                                              seed=config.calib_seed, max_positions=max_pos)
    if method.read_data is not None:  # methods reading their own data (qslaw), before any work
        calibration = method.read_data(src, config)
    model = method.run(src.model, fmt, config, calibration, progress)
    head_bits = resolve_head_bits(config.head_bits, fmt)
    if head_bits is not None:
        from otaro.head import quantize_head

        quantize_head(model, head_bits)
    extra = {"method": {"name": method.name, "config": asdict(config)}, "source": {"model": config.model, "kind": src.kind}}
    path = saver.save(model, config.output, tokenizer=src.tokenizer, overwrite=config.overwrite, extra=extra)
    if method.after_save is not None:
        method.after_save(model, path)
    return path
