"""``otaro finetune``: once-for-all fine-tuning of an SEFP model over a bit-width path.

Each step: the path (BPS or an ablation) picks a bit-width b; every quantized layer runs the
master weights through ``Q(w, b)`` (the deployment derivation, straight-through backward); the
loss is computed chunk by chunk over positions (``otaro.training.loss``: the batch's
full-vocabulary logits never exist); the LAA plan says whether the update uses this gradient
alone (high bit-width) or the running mean of the recent low-bit gradients; and the optimizer
steps once -- every step, so N steps are N updates. Before any data is read, the peak memory of
a step is estimated and a run that cannot fit is refused (``otaro.training.memory``). The same
code runs on one CPU, one GPU, or several processes through accelerate (DDP): every rank takes
the same path because the loss fed to the path is reduced across ranks first and every rank
seeds the path identically.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from otaro.errors import OtaroError
from otaro.training.config import FinetuneConfig
from otaro.training.estimate import human_seconds


def run_dir_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".run")


def lr_lambda(cfg: FinetuneConfig):
    """Multiplier of the base LR at a path step (one optimizer update per step, so path steps and
    updates are the same count)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


@dataclass
class _Run:
    """Everything one training run holds (kept together so resume can restore it in one place)."""

    cfg: FinetuneConfig
    accelerator: object
    model: object  # prepared (possibly DDP-wrapped) model
    raw: object  # the unwrapped transformers model
    teacher: object | None
    optimizer: object
    scheduler: object
    path: object
    laa: object
    order: object
    train: object
    heldout: object
    tokenizer: object
    step: int = 0
    optimizer_updates: int = 0
    memory_estimate: object | None = None  # otaro.training.memory.MemoryEstimate (None if it could not be made)
    init_report: object | None = None  # otaro.training.init.InitReport of --init (None without it)


def _check_device(cfg: FinetuneConfig) -> None:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise OtaroError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 (or no) on CPU")


def _check_memory(cfg: FinetuneConfig, model, accelerator):
    """Estimate a step's peak per process and refuse a run that cannot fit (before any data is
    read, the teacher is copied or a step runs); returns the estimate."""
    from otaro.training.memory import check_memory, estimate_memory, local_process_count

    try:
        est = estimate_memory(model, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              num_processes=accelerator.num_processes, distill=cfg.distill > 0,
                              gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision)
    except OtaroError:
        if cfg.ignore_memory_check:  # an unusual config the estimate cannot read: the user opted out
            return None
        raise
    if not cfg.ignore_memory_check:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        check_memory(est, accelerator.device, resident=est.weights if on_cpu else 0,
                     local_processes=local_process_count(accelerator.num_processes),
                     gradient_checkpointing=cfg.gradient_checkpointing)
    return est


def _prepare(cfg: FinetuneConfig, show_progress: bool) -> _Run:
    from accelerate import Accelerator

    from otaro.formats import get_format
    from otaro.modules import convert
    from otaro.sources import load_source
    from otaro.training.bps import make_path
    from otaro.training.data import BatchOrder, build_splits
    from otaro.training.laa import LAA, LAAConfig
    from otaro.training.loss import LossModel

    _check_device(cfg)
    # cpu=True on a machine without CUDA: otherwise accelerate does not start gloo under
    # torchrun and every process would train alone (docs/FACTS.md).
    # AcceleratorState is a process-wide singleton that refuses a second run with another
    # mixed precision; reset it (not the process group) so finetune() can be called repeatedly
    # from one Python process (benchmarks, notebooks). accelerate's own tests do the same.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if cfg.batch_size % accelerator.num_processes:
        raise OtaroError(f"batch size {cfg.batch_size} is not divisible by {accelerator.num_processes} processes")
    src = load_source(cfg.model)
    if src.kind == "checkpoint":
        raise OtaroError(f"{cfg.model} is a quantized checkpoint; fine-tune from the original model")
    if src.tokenizer is None:
        raise OtaroError(f"{cfg.model} has no tokenizer; fine-tuning needs one to read the data")
    model = src.model
    from otaro.sources import fit_seq_len

    # the default window fits the model; the resolved value is what config.json and --resume see
    cfg = dataclasses.replace(cfg, seq_len=fit_seq_len(cfg.seq_len, model.config))
    memory_estimate = _check_memory(cfg, model, accelerator)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    splits = build_splits(src.tokenizer, cfg.data, cfg.seq_len, cfg.heldout_fraction, cfg.seed, max_pos)
    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.distill > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    convert(model, get_format(cfg.format), packed=False)
    init_report = None
    if cfg.init:  # the master weights start at a quantized checkpoint's 8-bit weights (otaro.training.init)
        from otaro.training.init import apply_init

        init_report = apply_init(model, cfg.init)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prepared, optimizer = accelerator.prepare(LossModel(model, teacher, cfg.distill, cfg.distill_temperature),
                                              optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                                  lr_lambda(cfg))
    knobs = dict(segment_len=cfg.segment_len, explore=cfg.explore, ucb_c=cfg.ucb_c, epsilon=cfg.epsilon,
                 ema=cfg.ema, score=cfg.score)
    path = make_path(cfg.path, cfg.trained_bits if cfg.path == "fixed" else cfg.bits, cfg.seed, **knobs)
    laa = LAA(LAAConfig(enabled=cfg.laa, threshold=cfg.laa_threshold, k=cfg.laa_k, reduce=cfg.laa_reduce,
                        scale=cfg.laa_scale))
    order = BatchOrder(len(splits.train.input_ids), cfg.batch_size, cfg.seed, world=accelerator.num_processes)
    return _Run(cfg, accelerator, prepared, accelerator.unwrap_model(prepared).lm, teacher, optimizer, scheduler, path,
                laa, order, splits.train, splits.heldout, src.tokenizer, memory_estimate=memory_estimate,
                init_report=init_report)


def _loss_scale(run: _Run) -> float:
    """fp16's GradScaler factor (1 otherwise): the backward adds *scaled* gradients to p.grad."""
    scaler = getattr(run.accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def _optimizer_step(run: _Run, plan) -> None:
    """One optimizer step on what ``p.grad`` holds after the backward (see ``otaro.training.laa``):
    a low-bit plan's running mean is scaled for the update, then restored, because it is the
    accumulator the next low-bit step builds on; anything else is dropped."""
    from otaro.training.laa import scale_grads

    params = list(run.raw.parameters())
    scale_grads(params, plan.grad_factor)  # (n-1) A + g  ->  grad_scale * A_n
    coef = 1.0
    if run.cfg.grad_clip > 0:
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.grad_clip)
        # the factor torch's clip_grad_norm_ multiplied the gradients by, to undo it below
        coef = min(1.0, run.cfg.grad_clip / (float(norm) + 1e-6))
    run.optimizer.step()
    skipped = run.accelerator.optimizer_step_was_skipped  # fp16 overflow: non-finite gradients
    if plan.low and not skipped:
        scale_grads(params, 1.0 / (plan.grad_scale * coef))  # back to the unscaled, unclipped A_n
    else:
        run.optimizer.zero_grad(set_to_none=True)
    if not skipped:
        run.optimizer_updates += 1


def train_step(run: _Run) -> dict:
    """One path step (always one optimizer update); returns its log record."""
    from otaro.modules import set_precision
    from otaro.training.laa import scale_grads

    acc = run.accelerator
    bits = run.path.next_bits()
    plan = run.laa.plan(bits)
    set_precision(run.raw, bits)
    idx = run.order.shard(run.order.next_global_batch(), acc.process_index, acc.num_processes)
    input_ids = run.train.input_ids[idx].to(acc.device)
    labels = run.train.labels[idx].to(acc.device)
    # The low-bit accumulator A (p.grad) enters this backward as (n-1) * A, in the backward's
    # loss-scaled units under fp16; a factor of 0 (high-bit step, or a window restarting) drops it.
    scale_grads(run.raw, plan.keep * _loss_scale(run))
    with acc.autocast():
        loss = run.model(input_ids=input_ids, labels=labels)  # LossModel: the chunked loss
    acc.backward(loss)  # synchronised on every step: DDP averages the whole p.grad
    _optimizer_step(run, plan)
    run.laa.commit(plan)
    if plan.low and acc.optimizer_step_was_skipped:
        run.laa.reset_window()  # its gradients were dropped with the overflow
    lr = run.scheduler.get_last_lr()[0]
    with warnings.catch_warnings():
        # The schedule follows path steps (see lr_lambda); an fp16 overflow makes GradScaler skip
        # the optimizer step of that path step, which torch warns about.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
        run.scheduler.step()
    global_loss = float(acc.reduce(loss.detach().float(), reduction="mean"))
    run.path.observe(bits, global_loss)
    run.step += 1
    rec = {"step": run.step, "bits": bits, "loss": global_loss, "lr": lr, "update": "laa" if plan.low else "step"}
    if plan.low:
        rec["window"] = plan.window
    return rec


@torch.no_grad()
def evaluate(run: _Run, bits_list=None) -> dict[str, float]:
    """Mean held-out loss per bit-width (first ``eval_batches`` blocks, the same every time)."""
    from otaro.modules import set_precision
    from otaro.training.loss import causal_lm_loss

    if run.heldout is None or len(run.heldout.input_ids) == 0:
        return {}
    acc = run.accelerator
    n = min(len(run.heldout.input_ids), run.cfg.eval_batches)
    idx = list(range(n))[acc.process_index :: acc.num_processes] or [0]
    run.model.eval()
    out = {}
    for b in bits_list or run.cfg.trained_bits:
        set_precision(run.raw, b)
        losses = []
        for i in idx:
            with acc.autocast():
                r = causal_lm_loss(run.raw, run.heldout.input_ids[i : i + 1].to(acc.device),
                                   run.heldout.labels[i : i + 1].to(acc.device))
            losses.append(r.float())
        out[str(b)] = float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))
    run.model.train()
    return out


def _trainer_state(run: _Run) -> dict:
    return {
        "step": run.step, "optimizer_updates": run.optimizer_updates, "config": run.cfg.to_dict(),
        "path": run.path.state_dict(), "laa": run.laa.state_dict(), "order": run.order.state_dict(),
        "scheduler": {k: v for k, v in run.scheduler.state_dict().items() if k != "lr_lambdas"},
    }


def _save(run: _Run, run_dir: Path) -> None:
    from otaro.training.state import save_state

    acc = run.accelerator
    grads = None
    if run.laa.pending:
        mine = {n: p.grad.detach().clone() for n, p in run.raw.named_parameters() if p.grad is not None}
        gathered = [mine] if acc.num_processes == 1 else _gather_objects(acc, mine)
        grads = dict(enumerate(gathered))
    save_state(run_dir, model=run.raw, optimizer=run.optimizer, trainer=_trainer_state(run), grads=grads,
               is_main=acc.is_main_process)
    acc.wait_for_everyone()


def _gather_objects(acc, obj):
    import torch.distributed as dist

    out = [None] * acc.num_processes
    dist.all_gather_object(out, {k: v.cpu() for k, v in obj.items()})
    return out


def _resume(run: _Run, run_dir: Path) -> None:
    from otaro.training.state import load_state, read_trainer_json

    meta = read_trainer_json(run_dir)
    if meta is None:
        raise OtaroError(f"--resume: no saved state in {run_dir}")
    diff = run.cfg.resume_mismatch(meta["config"])
    if diff:
        raise OtaroError(f"--resume: {run_dir} was started with a different config ({', '.join(diff)})")
    meta, grads = load_state(run_dir, model=run.raw, optimizer=run.optimizer, rank=run.accelerator.process_index)
    run.step, run.optimizer_updates = meta["step"], meta["optimizer_updates"]
    run.path.load_state_dict(meta["path"])
    run.laa.load_state_dict(meta["laa"])
    run.order.load_state_dict(meta["order"])
    sched = run.scheduler.state_dict()
    sched.update(meta["scheduler"])
    run.scheduler.load_state_dict(sched)
    if grads:
        for n, p in run.raw.named_parameters():
            if n in grads:
                p.grad = grads[n].to(p.device, p.dtype)


def _plan_line(run: _Run) -> str:
    """One line before the first step: work, estimated peak memory and a rough time."""
    from otaro.training.estimate import estimate_time

    cfg, acc = run.cfg, run.accelerator
    left = cfg.steps - run.step
    est = estimate_time(run.raw, steps=left, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                        num_processes=acc.num_processes, distill=cfg.distill > 0, device=acc.device)
    mem = f"{run.memory_estimate.total / 2**30:.1f} GiB" if run.memory_estimate else "not estimated"
    return (f"finetune: {left} steps x {cfg.batch_size} x {cfg.seq_len} tokens on {acc.num_processes} process(es); "
            f"peak memory ~{mem} per process; time ~{human_seconds(est.total_seconds)} "
            f"({human_seconds(est.seconds_per_step)}/step; rough: FLOPs at this machine's measured matmul speed)")


def _check_output(cfg: FinetuneConfig, run_dir: Path) -> None:
    from otaro.training.state import read_trainer_json

    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise OtaroError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if not cfg.resume and not cfg.overwrite and read_trainer_json(run_dir) is not None:
        raise OtaroError(f"{run_dir} holds an unfinished run: pass --resume to continue it or --overwrite to restart")
    from otaro.io import check_writable_output

    check_writable_output(out)  # hours of training must not end in "permission denied"
    check_writable_output(run_dir)


def _left_behind(cfg: FinetuneConfig, started: float) -> str:
    """What an interrupted run leaves on disk, for the CLI's "interrupted: ..." line."""
    from otaro.training.state import read_trainer_json

    out, run_dir = Path(cfg.output), run_dir_for(cfg.output)
    manifest = out / "otaro.json"
    if manifest.is_file() and manifest.stat().st_mtime >= started:
        return f"{out} was written; {run_dir}/training.png was not"
    try:
        state = read_trainer_json(run_dir) is not None
    except OtaroError:
        state = False
    if state:
        return f"{run_dir}/ holds the state to --resume; no checkpoint was written"
    if run_dir.is_dir():
        return f"no checkpoint was written; {run_dir}/ holds no resumable state yet (start again with --overwrite)"
    return "no output was written"


def finetune(cfg: FinetuneConfig, show_progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or resume) the fine-tuning and write the SEFP checkpoint; returns its path.

    Ctrl-C / SIGTERM raise :class:`~otaro.errors.Interrupted` saying what was left on disk (the
    run folder is written as training goes, unlike the atomic checkpoint)."""
    from otaro.errors import Interrupted

    started = time.time()
    try:
        return _finetune(cfg, show_progress, stop_after)
    except Interrupted:
        raise
    except KeyboardInterrupt as e:
        raise Interrupted(_left_behind(cfg, started)) from e


def _finetune(cfg: FinetuneConfig, show_progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or resume) the fine-tuning and write the SEFP checkpoint; returns its path.

    ``stop_after`` ends the process's work after that many steps without writing the final
    checkpoint (state is saved first): tests use it to simulate an interrupted run.
    """
    from otaro import checkpoint
    from otaro.io import write_json
    from otaro.progress import progress
    from otaro.arch.multimodal import refuse_multimodal
    from otaro.sources import model_type_of
    from otaro.training.report import JsonlLog, plot_training, read_log

    # A LLaVA folder loads (otaro.sources), but the trainer's memory estimate, chunked loss and
    # text windows are a causal LM's: refused from config.json, before any weight loads.
    refuse_multimodal(model_type_of(cfg.model), "otaro finetune", "it trains causal LMs only "
                      "(quantize it with --method qslaw, which trains its group scales on text)")
    run_dir = run_dir_for(cfg.output)
    _check_output(cfg, run_dir)
    run = _prepare(cfg, show_progress)
    cfg = run.cfg  # with the window length resolved against the model
    acc = run.accelerator
    if cfg.resume:
        _resume(run, run_dir)
    elif acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
    log = JsonlLog(run_dir / "log.jsonl", acc.is_main_process, truncate_after_step=run.step if cfg.resume else None)
    ema: dict[int, float] = {}
    t0 = time.perf_counter()
    bar = progress(total=cfg.steps, initial=run.step, desc="finetune", unit="step",
                   enabled=show_progress and acc.is_main_process)
    say = bar.write if show_progress and acc.is_main_process else (lambda msg: None)
    if run.step < cfg.steps:
        say(_plan_line(run))
    if run.init_report is not None and run.step == 0:
        say(run.init_report.line(cfg.init))
    first_step_at = None
    if run.step == 0:
        log.write({"step": 0, "eval": evaluate(run)})  # the starting point of every curve
    with bar:
        while run.step < cfg.steps:
            step_t0 = time.perf_counter()
            rec = train_step(run)
            if first_step_at is None:
                first_step_at = time.perf_counter() - step_t0
                left = cfg.steps - run.step
                if left:
                    say(f"finetune: step {run.step} took {human_seconds(first_step_at)}: about "
                        f"{human_seconds(first_step_at * left)} for the {left} steps left (plus evaluations)")
            ema[rec["bits"]] = rec["loss"] if rec["bits"] not in ema else 0.9 * ema[rec["bits"]] + 0.1 * rec["loss"]
            log.write({**rec, "time": round(time.perf_counter() - t0, 3)})
            bar.update(1)
            bar.set_postfix_str(" ".join(f"b{b}:{v:.2f}" for b, v in sorted(ema.items())))
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                log.write({"step": run.step, "eval": evaluate(run)})
            if run.step % cfg.save_every == 0 and run.step < cfg.steps:
                _save(run, run_dir)
            if stop_after is not None and run.step >= stop_after:
                return None
    # Every low-bit gradient is already in an update (LAA never defers one past its own step);
    # the running mean left in p.grad is only the seed of a next step that will not come.
    run.optimizer.zero_grad(set_to_none=True)
    final_eval = evaluate(run)
    log.write({"step": run.step, "eval": final_eval, "final": True})
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return Path(cfg.output)
    history = list(run.path.history)
    extra = {
        "method": {"name": "otaro-finetune", "config": cfg.to_dict()},
        "source": {"model": cfg.model, "kind": "finetune"},
        "finetune": {
            "path": history, "path_scheduler": run.path.describe(), "steps": run.step,
            "optimizer_updates": run.optimizer_updates, "laa_low_bit_updates": run.laa.low_updates,
            "memory_estimate_bytes": run.memory_estimate.total if run.memory_estimate else None,
            "final_heldout_loss": final_eval, "seconds": round(time.perf_counter() - t0, 2),
            "init": None if run.init_report is None else {
                "checkpoint": str(cfg.init), "codes_reproduced": round(run.init_report.fraction, 6)},
        },
    }
    run.raw.eval()
    from otaro.head import quantize_head
    from otaro.modules import pack
    from otaro.quantize import resolve_head_bits

    head_bits = resolve_head_bits(cfg.head_bits, run.raw.otaro.fmt)
    if head_bits is not None:  # trained in float; stored as codes like the linears (otaro.head)
        pack(run.raw)
        quantize_head(run.raw, head_bits)
    path = checkpoint.save(run.raw, cfg.output, tokenizer=run.tokenizer, overwrite=cfg.overwrite, extra=extra,
                           trained_bits=cfg.trained_bits)
    plot_training(read_log(run_dir / "log.jsonl"), run_dir / "training.png", f"{Path(cfg.output).name}: path and loss")
    acc.wait_for_everyone()
    return path
