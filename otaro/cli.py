"""The ``otaro`` command line. Each command builds a frozen config and calls the Python API;
user mistakes (``OtaroError``) print one line and exit 1, with no traceback and no output left."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from otaro import __version__
from otaro.errors import OtaroError


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every atomic writer removes its partial output."""


def _on_sigterm(signum, frame):
    raise _Terminated()


class _StdoutFailed(OSError):
    """Writing standard output failed (``> /dev/full``, a full disk): told apart from an
    OSError of some other file, which keeps its traceback."""


class _GuardedStdout:
    """sys.stdout during a command: the same stream, with its write errors marked as ours.
    Everything else (encoding, fileno, isatty, buffer) is the stream's own, so click and rich
    use it as they would sys.stdout."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise  # `otaro ... | head`: click exits 1 quietly
            err = _StdoutFailed(e.errno, e.strerror)
            err.otaro_stdout = True  # otaro.io: not a write error of the output being built
            raise err from None

    def write(self, s):
        return self._guard(self._stream.write, s)

    def writelines(self, lines):
        return self._guard(self._stream.writelines, lines)

    def flush(self):
        return self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout(stream) -> None:
    """Point fd 1 at /dev/null: the interpreter flushes stdout at exit, and a second failure
    there would print "Exception ignored" and exit 120 after our one line."""
    import os

    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # not a real file (CliRunner)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


class _Group(click.Group):
    def invoke(self, ctx):
        import signal
        import threading

        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
        try:
            rv = super().invoke(ctx)
            sys.stdout.flush()  # a full stdout (> /dev/full) fails here, inside our handlers
            return rv
        except OtaroError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            # A command that leaves something behind on purpose (finetune's resumable run
            # folder) says what in Interrupted.left; the atomic writers leave nothing.
            left = getattr(e, "left", None) or "no output was written"
            click.echo(f"interrupted: {left}", err=True)
            sys.exit(143 if isinstance(e, _Terminated) or isinstance(e.__context__, _Terminated)
                     or isinstance(e.__cause__, _Terminated) else 130)
        except _StdoutFailed as e:
            _silence_stdout(stdout)
            raise click.ClickException(f"cannot write to standard output: {e.strerror or e}") from None
        finally:
            sys.stdout = stdout
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="otaro")
def cli():
    """otaro: tune an LLM once, deploy it at every weight precision from 2 to 8 bits.

    \b
    Typical flow:
      otaro quantize MODEL -o ckpt           # SEFP (or int) checkpoint, round-to-nearest
      otaro eval ckpt --corpus brown-eval    # perplexity at b = 2..8, table + JSON + PNG
      otaro formats                          # the number formats and their bits per weight

    MODEL is a local Hugging Face folder, an otaro checkpoint, a benchmark alias
    (smollm2-135m) or a tiny random model (tiny-llama, tiny-qwen2, ...). Nothing is downloaded.
    """


def _bits_option(default: str = "2-8"):
    def parse(ctx, param, value):
        from otaro.formats import parse_bits

        try:
            return parse_bits(value)
        except OtaroError as e:
            raise click.BadParameter(str(e)) from None

    return click.option("--bits", default=default, show_default=True, callback=parse,
                        help="Bit-widths to use: a range '2-8' or a list '2,3,4,8' (each 2..8).")


def _model_stem(model: str) -> str:
    """A model's name for default output names: the folder's own name for a path (`.` or
    `../x/` have none of their own), the name itself for `tiny-llama` or an alias."""
    p = Path(model)
    return p.resolve().name if p.exists() else p.name or model


class _QuantizeCommand(click.Command):
    """`quantize --help` ends with the registered methods, generated from otaro.methods.METHODS
    so that a new method shows up without anyone editing the help text."""

    def format_epilog(self, ctx, formatter):
        from otaro.methods import METHODS

        with formatter.section("Methods"):
            formatter.write_dl([
                (m.name, f"{m.description} [{'/'.join(m.families)}"
                         f"{'; needs --task' if m.multi_task else '; needs --calib' if m.needs_calibration else ''}]")
                for m in METHODS.values()])
        super().format_epilog(ctx, formatter)


class _HeadBits(click.ParamType):
    """--head-bits: auto | float | a bit-width 2-8."""

    name = "auto|float|2-8"

    def convert(self, value, param, ctx):
        if value in ("auto", "float", None) or isinstance(value, int):
            return value
        if isinstance(value, str) and value.isdigit() and 2 <= int(value) <= 8:
            return int(value)
        self.fail(f"{value!r} is not auto, float or a bit-width 2-8", param, ctx)


HEAD_BITS_HELP = ("The LM head and the embedding: stored as SEFP codes with the head at this precision (its own: "
                  "a plain --bits/set_precision switch leaves it, the pattern lm_head=B changes it), or float. "
                  "auto: 8 for SEFP formats, float for integer formats.")


def _format_choice():
    from otaro.formats import quantized_format_names

    return click.Choice(quantized_format_names())


@cli.command()
@click.option("--family", type=click.Choice(["sefp", "int", "float"]), help="Only this family.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def formats(family, as_json):
    """List the number formats: bits per weight (exponent/scale overhead included), the
    MatMulNBits container each precision runs in, and the bit-planes a kernel reads."""
    from otaro.formats_cli import format_rows, print_formats

    rows = format_rows(family)
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
    else:
        print_formats(rows)


@cli.command(cls=_QuantizeCommand)
@click.argument("model")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Checkpoint folder to write [default: ./<model>-<format>-<method>].")
@click.option("--method", default="rtn", show_default=True, help="Quantization method (see the list below).")
@click.option("--format", "fmt", default=None, metavar="FORMAT",
              help="Number format from `otaro formats`, e.g. ssfp-g64-nearest, sefp-g64-trunc, int4-g128-asym "
                   "[default: the project default SEFP row].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--calib", "calib", multiple=True, metavar="SPEC",
              help="Calibration text for gptq: .txt, .jsonl, a folder, a saved `datasets` folder or corpus:NAME "
                   "(repeatable, or a comma list).")
@click.option("--calib-samples", default=128, show_default=True, help="Calibration windows to draw.")
@click.option("--calib-len", default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--calib-seed", default=0, show_default=True, help="Seed of the window draw.")
@click.option("--bits", "bits", metavar="SPEC",
              help="Target bit-widths with optional weights, e.g. '3:1,4:1,8:1' or '2-8' (SEFP: the precisions "
                   "gptq optimizes for, default all; int: only the format's own bit-width).")
@click.option("--damp", default=0.01, show_default=True, help="GPTQ damping, a fraction of the mean Hessian diagonal.")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ: quantize columns by decreasing Hessian diagonal (groups stay static, so the layout is unchanged).")
@click.option("--block-size", default=128, show_default=True, help="GPTQ: columns per lazy batch update.")
@click.option("--scale-search/--no-scale-search", default=True, show_default=True,
              help="mbrtn/gptq on SEFP: pick each group's shared scale (exponent E or E-1; fp16 clipping grid) "
                   "by the same weighted error.")
@click.option("--search-samples", default=8, show_default=True,
              help="awq: calibration windows the scale grid search runs each layer on (the statistics and the "
                   "clipping search use all --calib-samples); the search is most of awq's time.")
@click.option("--save-format", "save_format", type=click.Choice(["otaro", "hf"]), default="otaro", show_default=True,
              help="otaro: checkpoint + otaro.json. hf (int formats): a Hugging Face folder that transformers, "
                   "AutoGPTQ/AutoAWQ and onnxruntime-genai's model builder read: GPTQ v1 layout for rtn/gptq, "
                   "AWQ GEMM (4-bit) for awq.")
@click.option("--task", "tasks", multiple=True, metavar="NAME=ADAPTER:DATA",
              help="Multi-task methods (mlgptq, mlawq, gptq-pooled, awq-pooled): a task's PEFT LoRA folder and its "
                   "calibration data (specs as --calib, comma list); repeatable, one per task.")
@click.option("--task-stats", "task_stats", type=click.Path(file_okay=False), metavar="DIR",
              help="Multi-task methods: keep each task's statistics here and reuse them, so adding a task "
                   "collects only the new one.")
@click.option("--ml-hessian", "ml_hessian", type=click.Choice(["diag-max", "max-psd", "max"]), default="diag-max",
              show_default=True,
              help="mlgptq/mlawq: how the task Hessians combine. diag-max: the pooled Hessian rescaled so each "
                   "channel's curvature is its largest over the tasks; max-psd: the element-wise max, projected onto "
                   "the positive semi-definite matrices GPTQ needs; max: the literal max (GPTQ raises its damping "
                   "where it is not PSD).")
@click.option("--head-bits", "head_bits", type=_HeadBits(), default="auto", show_default=True, help=HEAD_BITS_HELP)
# The per-method options below (qslaw_*, recon_*, lsi_*) reach QuantizeConfig by name, so their defaults here are its defaults.
@click.option("--qslaw-data", "qslaw_data", multiple=True, metavar="SPEC",
              help="qslaw: task data the scale factors are trained on (specs as --calib; repeatable or a comma list).")
@click.option("--qslaw-generic", "qslaw_generic", multiple=True, metavar="SPEC",
              help="qslaw: generic text mixed 1:1 with the task data after the warmup (specs as --calib).")
@click.option("--qslaw-steps", "qslaw_steps", default=200, show_default=True, help="qslaw: optimizer steps.")
@click.option("--qslaw-warmup", "qslaw_warmup", default=50, show_default=True,
              help="qslaw: η, the first steps that draw task data only (0 to --qslaw-steps).")
@click.option("--qslaw-lr", "qslaw_lr", default=1e-3, show_default=True,
              help="qslaw: peak Adam learning rate (3% linear warm-up, then cosine).")
@click.option("--qslaw-batch-size", "qslaw_batch_size", default=4, show_default=True,
              help="qslaw: rows per step (task + generic).")
@click.option("--qslaw-seq-len", "qslaw_seq_len", default=256, show_default=True, help="qslaw: tokens per row.")
@click.option("--qslaw-projector", "qslaw_projector", type=click.Choice(["auto", "train", "freeze"]), default="auto",
              show_default=True,
              help="qslaw on a multimodal model (a LLaVA folder): train its projector with the scales on image rows "
                   "(auto: if it has one and the data have images; the text data read here never run it, so it "
                   "stays frozen).")
# Block reconstruction's options (sb/la/mb/lsi) also reach QuantizeConfig by name, through the same
# keyword catch-all; None = the method's own default, which the manifest then records.
@click.option("--recon-blocks", "recon_blocks", type=int, default=None,
              help="la/mb: decoder blocks per window, n of LA-n (loss n-1 fp blocks after the tuned one) or MB-n "
                   "(n blocks tuned jointly) [default: 2; sb and lsi: 1].")
@click.option("--recon-iters", "recon_iters", type=int, default=None,
              help="sb/la/mb: SignSGD steps per window [default: 200].")
@click.option("--recon-lr", "recon_lr", type=float, default=None,
              help="sb/la/mb/lsi: learning rate [default: 1/--recon-iters, linearly decayed; lsi: AdamW 2e-4].")
@click.option("--recon-batch", "recon_batch", type=int, default=None,
              help="sb/la/mb/lsi: calibration windows per step [default: 8; lsi: 1].")
@click.option("--lsi-epochs", "lsi_epochs", default=2, show_default=True,
              help="lsi: passes over the calibration windows per block.")
@click.option("--lsi-k", "lsi_k", default=0, show_default=True,
              help="lsi: size of the dense k×k increment on the leading singular values (0: diagonal increments only).")
def quantize(model, output, method, fmt, overwrite, calib, calib_samples, calib_len, calib_seed, bits, damp,
             act_order, block_size, scale_search, search_samples, save_format, tasks, task_stats, ml_hessian,
             head_bits, **method_options):
    """Quantize MODEL and write a checkpoint (safetensors + otaro.json manifest).

    An SEFP checkpoint stores 8-bit mantissas and per-group exponents once; every precision
    from 2 to 8 bits is derived from it at load or run time (`otaro eval --bits`).
    The methods (--method) are listed below.
    """
    from pathlib import Path

    from otaro.formats import DEFAULT_SEFP
    from otaro.quantize import QuantizeConfig, quantize as run

    fmt = fmt or DEFAULT_SEFP

    output = output or f"{_model_stem(model)}-{fmt}-{method}"
    calib = tuple(part for value in calib for part in value.split(",") if part)
    cfg = QuantizeConfig(model=model, output=output, method=method, format=fmt, overwrite=overwrite, calib=calib,
                         calib_samples=calib_samples, calib_len=calib_len, calib_seed=calib_seed, bits=bits or (),
                         damp=damp, act_order=act_order, block_size=block_size, scale_search=scale_search,
                         search_samples=search_samples, save_format=save_format, tasks=tuple(tasks), task_stats=task_stats,
                         ml_hessian=ml_hessian, head_bits=None if head_bits == "float" else head_bits, **method_options)
    from otaro.progress import progress

    with progress(desc=f"{method} {fmt}", unit="layer") as bar:
        path = run(cfg, progress=lambda name: bar.update(1))
    click.echo(f"wrote {path}")


@cli.command(name="eval")
@click.argument("model")
@click.option("--text", "texts", multiple=True, type=click.Path(), help="UTF-8 text file or folder of .txt files (repeatable).")
@click.option("--corpus", "corpora", multiple=True, help="Offline corpus: brown-train, brown-eval, austen (repeatable).")
@_bits_option()
@click.option("--format", "fmts", multiple=True, metavar="FORMAT",
              help="For an unquantized MODEL: quantize it on the fly (RTN) in this format (repeatable).")
@click.option("--no-baseline", is_flag=True, help="Skip the unquantized fp32 row.")
@click.option("--seq-len", type=int, help="Tokens per evaluation window [default: 512, or the model's maximum positions if smaller].")
@click.option("--max-windows", default=40, show_default=True, help="Windows per text, evenly spaced (0 = all).")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--threads", type=int, help="CPU threads for torch [default: torch's].")
@click.option("--reference", metavar="MODEL",
              help="Unquantized model the KLD/top-1 metrics compare against (HF folder or model name, loaded fp32; "
                   "same vocabulary and tokenizer) [default: the checkpoint's source model, or MODEL itself].")
@click.option("--no-reference", is_flag=True, help="Skip the KLD and top-1 metrics.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Folder for eval.json and eval.png [default: ./eval-<model>].")
@click.option("--head-bits", "head_bits", type=_HeadBits(), default="auto", show_default=True,
              help="With --format: the head and embedding of the model quantized on the fly, as `otaro quantize "
                   "--head-bits` stores them (a checkpoint is evaluated as stored).")
def eval_cmd(model, texts, corpora, bits, fmts, no_baseline, seq_len, max_windows, batch_size, threads, reference,
             no_reference, output, head_bits):
    """Perplexity, bits-per-byte and fidelity to an unquantized reference of MODEL at each bit-width.

    MODEL is an otaro checkpoint (evaluated at --bits), or an unquantized model evaluated in
    fp32 and, with --format, quantized on the fly. Prints a table and writes eval.json and a
    plot (eval.png: perplexity vs bits, and KLD vs bits when measured).

    \b
    Fidelity over the same windows (like llama.cpp's --kl-divergence):
      KLD    mean KL(P_ref || P_quant), nats per predicted token (0 = same)
      p99    99th percentile of the per-token KL (the worst positions)
      top-1  % of positions where quantized and reference argmax agree

    The reference is --reference, else the source model recorded in the checkpoint (when it
    loads here), else, for a model quantized on the fly, the unquantized model itself. Its
    log-probs are computed once and reused for every bit-width (memory-mapped in a temporary
    folder when large: vocab x tokens x 4 bytes). Without a reference the metrics are skipped.
    """
    from pathlib import Path

    from otaro.evaluation import report
    from otaro.evaluation.run import EvalConfig, run_eval

    cfg = EvalConfig(
        model=model, texts=tuple(texts) + tuple(f"corpus:{c}" for c in corpora), bits=bits, formats=tuple(fmts),
        baseline=not no_baseline, seq_len=seq_len, max_windows=max_windows or None, batch_size=batch_size,
        threads=threads, reference=reference, use_reference=not no_reference,
        head_bits=None if head_bits == "float" else head_bits,
    )
    from otaro.io import check_writable_output

    output = output or f"eval-{_model_stem(model)}"
    check_writable_output(output)  # fail before the model loads and every window is scored
    result = run_eval(cfg)
    if result["reference"]["note"]:
        click.echo(f"note: {result['reference']['note']}", err=True)
    title = f"{result['model']['name']} — perplexity per bit-width"
    if any(r["kld"] is not None for r in result["rows"]):
        title += f", KLD/top-1 vs {Path(result['reference']['model']).name}"
    click.echo(report.table_text(result["rows"], title))
    out = report.save(result, output, title)
    click.echo(f"wrote {out['json']} and {out['png']} ({result['seconds']:.1f} s)")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(path, as_json):
    """Show a checkpoint or exported artifact: manifest, layers or variants, and what each precision costs in bytes."""
    from otaro.inspect import describe

    click.echo(describe(path, as_json=as_json))

@cli.command()
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True,
              help="Training text: .txt file, .jsonl (text or prompt/response), a folder, a saved `datasets` folder, or corpus:NAME (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="SEFP checkpoint folder to write (run state and logs go to OUTPUT.run/).")
@_bits_option()
@click.option("--format", "fmt", default=None, metavar="FORMAT",
              help="SEFP format to train [default: the project default SEFP row, `otaro formats`].")
@click.option("--path", "path_name", default="bps", show_default=True,
              type=click.Choice(["bps", "round-robin", "random", "fixed"]), help="Bit-width path: BPS or an ablation.")
@click.option("--fixed-bits", type=int, help="With --path fixed: the one bit-width to train (a per-bit 'model zoo' run).")
@click.option("--segment-len", default=16, show_default=True, help="BPS: steps per path segment (the top precision gets >= 1 slot per segment).")
@click.option("--explore", default="ucb", show_default=True, type=click.Choice(["ucb", "epsilon"]), help="BPS exploration rule.")
@click.option("--ucb-c", default=1.0, show_default=True, help="BPS: UCB exploration weight.")
@click.option("--epsilon", default=0.1, show_default=True, help="BPS: exploration probability with --explore epsilon.")
@click.option("--score", default="gap", show_default=True, type=click.Choice(["gap", "loss"]), help="BPS score: loss gap to the top precision, or the loss.")
@click.option("--laa/--no-laa", default=False, show_default=True,
              help="Low-precision asynchronous accumulation (the paper's LAA; off by default: it raised b3/b4 KLD here).")
@click.option("--laa-threshold", default=4, show_default=True, help="LAA: bit-widths <= this accumulate.")
@click.option("--laa-k", default=4, show_default=True,
              help="LAA: low-bit gradients averaged into each low-bit update (a running mean; every step updates).")
@click.option("--steps", default=200, show_default=True)
@click.option("--seq-len", type=int, help="Tokens per training sequence [default: 512, or the model's maximum positions if smaller].")
@click.option("--batch-size", default=8, show_default=True, help="Global batch (split across processes).")
@click.option("--lr", default=2e-5, show_default=True)
@click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "linear", "constant"]))
@click.option("--warmup-steps", default=10, show_default=True)
@click.option("--grad-clip", default=1.0, show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--distill", default=1.0, show_default=True,
              help="Weight of a KL term to the full-precision model's logits (0 = no teacher, less memory).")
@click.option("--mixed-precision", default="no", show_default=True, type=click.Choice(["no", "bf16", "fp16"]))
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--heldout-fraction", default=0.05, show_default=True)
@click.option("--eval-every", default=50, show_default=True)
@click.option("--save-every", default=50, show_default=True, help="Steps between resumable state saves.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run saved in OUTPUT.run/ (same config required).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output / run folder.")
@click.option("--ignore-memory-check", is_flag=True,
              help="Train even if the up-front estimate of peak memory exceeds the memory available.")
@click.option("--head-bits", "head_bits", type=_HeadBits(), default="auto", show_default=True,
              help=HEAD_BITS_HELP + " The head is trained in float and stored as codes at the end.")
@click.option("--init", "init", type=click.Path(file_okay=False), default=None,
              help="Start from this quantized checkpoint of MODEL in the same --format (e.g. `otaro quantize "
                   "--method gptq --bits 3:16,4:4,8:1`): the weights begin at its 8-bit codes instead of the "
                   "float weights. Distillation still learns from MODEL.")
def finetune(model, data, output, bits, fmt, path_name, fixed_bits, segment_len, explore, ucb_c, epsilon, score, laa,
             laa_threshold, laa_k, steps, seq_len, batch_size, lr, schedule, warmup_steps, grad_clip, weight_decay,
             distill, mixed_precision, gradient_checkpointing, heldout_fraction, eval_every, save_every, seed, resume,
             overwrite, ignore_memory_check, head_bits, init):
    """Fine-tune MODEL once so that one SEFP checkpoint is good at every bit-width in --bits.

    Each step runs the model at the bit-width the path picks (BPS: a score per bit-width plus
    exploration; the top precision is never starved); each low-bit step updates with a running
    mean of the recent low-bit gradients (LAA), so every step is one optimizer update. Runs on CPU, one GPU, or several with
    `accelerate launch` / `torchrun` (same command). Logs, a resumable state and a plot of the
    path and losses go to OUTPUT.run/.
    """
    from otaro.formats import DEFAULT_SEFP
    from otaro.training.config import FinetuneConfig
    from otaro.training.trainer import finetune as run

    cfg = FinetuneConfig(
        model=model, data=tuple(data), output=output, format=fmt or DEFAULT_SEFP, bits=bits, path=path_name, fixed_bits=fixed_bits,
        segment_len=segment_len, explore=explore, ucb_c=ucb_c, epsilon=epsilon, score=score, laa=laa,
        laa_threshold=laa_threshold, laa_k=laa_k, steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr,
        schedule=schedule, warmup_steps=warmup_steps, grad_clip=grad_clip, weight_decay=weight_decay, distill=distill,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        heldout_fraction=heldout_fraction, eval_every=eval_every, save_every=save_every, seed=seed, resume=resume,
        overwrite=overwrite, ignore_memory_check=ignore_memory_check,
        head_bits=None if head_bits == "float" else head_bits, init=init,
    )
    path = run(cfg)
    if path is not None:
        click.echo(f"wrote {path} (logs and training.png in {path}.run)")


def _not_built(verb: str, issue: str):
    @cli.command(name=verb, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 help=f"[not built yet] {issue}", add_help_option=True)
    def cmd():
        raise click.ClickException(f"`otaro {verb}` is not built yet: {issue}")

    return cmd


EXPORTERS = {"onnx": "otaro.export.artifact"}  # format -> module with export(ExportConfig)


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(sorted(EXPORTERS)),
              help="Export format.")
@click.option("--variant", "variants", multiple=True, metavar="SPEC",
              help="Also write variants/<name>/ (repeatable): sefp:B[,B...] for fixed-precision MatMulNBits copies "
                   "of the SEFP model, or [NAME=]PATH for an integer checkpoint (GPTQ/AWQ/RTN from `otaro quantize`).")
@click.option("--bits", "default_bits", type=click.IntRange(2, 8),
              help="Precision the single model runs at in stock runtimes [default: the checkpoint's, usually 8].")
@click.option("--accuracy-level", default=4, show_default=True, type=click.IntRange(0, 4),
              help="MatMulNBits accuracy_level: 4 = int8 activations (fast; ~0.5% activation rounding), "
                   "1 = fp32 activations (exact; 2/8-bit containers then dequantize per call on CPU, much slower).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check every bit-width and variant against torch (logits and greedy tokens).")
@click.option("--validate-tokens", default=8, show_default=True, type=click.IntRange(min=1),
              help="Greedy tokens compared per check.")
@click.option("--threads", type=int, help="onnxruntime threads for validation [default: all cores].")
@click.option("--graph", default="auto", show_default=True, type=click.Choice(["auto", "fused", "traced"]),
              help="Decoder graph: fused = onnxruntime-genai's model builder (GroupQueryAttention; llama family; "
                   "~2x faster decode on CPU), traced = optimum's trace (every architecture), auto = fused where it "
                   "applies.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def export(checkpoint, output, fmt, variants, default_bits, accuracy_level, validate, validate_tokens, threads,
           graph, overwrite):
    """Export an SEFP CHECKPOINT as one ONNX model that runs at every bit-width, plus variants.

    The folder holds model.onnx (+ model.onnx_data): int8 mantissas and per-group exponents stored
    once, as an ai.otaro.SefpMatMul model-local function made of standard ONNX ops, so plain
    onnxruntime, optimum's ORTModelForCausalLM and onnxruntime-genai run it (at --bits) while the
    otaro runtime switches precision without a second file. It also holds config, tokenizer,
    genai_config.json, otaro_artifact.json (manifest with checksums and validation results) and
    variants/ (MatMulNBits models, each a runnable folder).

    \b
    Examples:
      otaro export ck-sefp -o art
      otaro export ck-sefp -o art --variant sefp:4 --variant gptq=ck-int4-gptq --accuracy-level 4
    """
    import importlib

    from otaro.export.artifact import ExportConfig

    cfg = ExportConfig(checkpoint=Path(checkpoint), output=Path(output), variants=tuple(variants),
                       default_bits=default_bits, accuracy_level=accuracy_level, validate=validate,
                       validate_tokens=validate_tokens, overwrite=overwrite, threads=threads, graph=graph)
    m = importlib.import_module(EXPORTERS[fmt]).export(cfg, progress=lambda s: click.echo(f"• {s}", err=True))
    val = m["validation"]
    if val.get("skipped"):
        summary = "validation skipped"
    else:
        n = len(val["results"])
        summary = f"validated {n}/{n} (bits {','.join(str(b) for b in m['bits'])} + {len(m['variants'])} variants)"
    click.echo(f"wrote {output} in {m['export_seconds']:.1f} s: {summary}; `otaro inspect {output}` for details")


from otaro.runtime.run_cli import run as _run  # noqa: E402  (click only; the runtime loads when it runs)

cli.add_command(_run)
from otaro.profiling.cli import profile as _profile  # noqa: E402  (click only, like `run`)

cli.add_command(_profile)


def main():
    # `--help` / `--version` print outside any command (_Group.invoke): a full stdout must fail
    # here too, in one line, not in the interpreter's final flush ("Exception ignored", exit 120).
    stdout = sys.stdout
    guard = sys.stdout = _GuardedStdout(stdout)
    try:
        try:
            cli(prog_name="otaro")
            code = 0
        except SystemExit as e:
            code = e.code
        sys.stdout.flush()
    except _StdoutFailed as e:
        _silence_stdout(stdout)
        click.echo(f"Error: cannot write to standard output: {e.strerror or e}", err=True)
        code = 1
    finally:
        if sys.stdout is guard:  # else click's broken-pipe wrapper, which must stay for the exit flush
            sys.stdout = stdout
    sys.exit(code)


if __name__ == "__main__":
    main()
