"""The ``otaro`` command line. Each command builds a frozen config and calls the Python API;
user mistakes (``OtaroError``) print one line and exit 1, with no traceback and no output left."""

from __future__ import annotations

import sys

import click

from otaro import __version__
from otaro.errors import OtaroError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OtaroError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)


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


@cli.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Checkpoint folder to write [default: ./<model>-<format>-<method>].")
@click.option("--method", default="rtn", show_default=True, help="Quantization method (see the list below).")
@click.option("--format", "fmt", default="sefp-g64-trunc", show_default=True, metavar="FORMAT",
              help="Number format from `otaro formats`, e.g. sefp-g64-trunc, sefp-g128-nearest, int4-g128-asym.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def quantize(model, output, method, fmt, overwrite):
    """Quantize MODEL and write a checkpoint (safetensors + otaro.json manifest).

    An SEFP checkpoint stores 8-bit mantissas and per-group exponents once; every precision
    from 2 to 8 bits is derived from it at load or run time (`otaro eval --bits`).
    Methods: rtn (round-to-nearest / direct encoding, no data). GPTQ, AWQ and the other
    post-training methods plug into this command as they land.
    """
    from pathlib import Path

    from otaro.quantize import QuantizeConfig, quantize as run

    output = output or f"{Path(model).name}-{fmt}-{method}"
    cfg = QuantizeConfig(model=model, output=output, method=method, format=fmt, overwrite=overwrite)
    from tqdm.auto import tqdm

    with tqdm(desc=f"{method} {fmt}", unit="layer", disable=None, leave=False) as bar:
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
@click.option("--seq-len", default=512, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-windows", default=40, show_default=True, help="Windows per text, evenly spaced (0 = all).")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--threads", type=int, help="CPU threads for torch [default: torch's].")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Folder for eval.json and eval.png [default: ./eval-<model>].")
def eval_cmd(model, texts, corpora, bits, fmts, no_baseline, seq_len, max_windows, batch_size, threads, output):
    """Perplexity and bits-per-byte of MODEL at each bit-width.

    MODEL is an otaro checkpoint (evaluated at --bits), or an unquantized model evaluated in
    fp32 and, with --format, quantized on the fly. Prints a table and writes eval.json and a
    perplexity-vs-bits plot (eval.png).
    """
    from pathlib import Path

    from otaro.evaluation import report
    from otaro.evaluation.run import EvalConfig, run_eval

    cfg = EvalConfig(
        model=model, texts=tuple(texts) + tuple(f"corpus:{c}" for c in corpora), bits=bits, formats=tuple(fmts),
        baseline=not no_baseline, seq_len=seq_len, max_windows=max_windows or None, batch_size=batch_size,
        threads=threads,
    )
    result = run_eval(cfg)
    title = f"{result['model']['name']} — perplexity per bit-width"
    click.echo(report.table_text(result["rows"], title))
    out = report.save(result, output or f"eval-{Path(model).name}", title)
    click.echo(f"wrote {out['json']} and {out['png']} ({result['seconds']:.1f} s)")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(path, as_json):
    """Show a checkpoint's manifest, its layers and what each precision costs in bytes."""
    from otaro.inspect import describe

    click.echo(describe(path, as_json=as_json))


def _not_built(verb: str, issue: str):
    @cli.command(name=verb, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 help=f"[not built yet] {issue}", add_help_option=True)
    def cmd():
        raise click.ClickException(f"`otaro {verb}` is not built yet: {issue}")

    return cmd


_not_built("finetune", "once-for-all fine-tuning with bit-width path search (BPS) and LAA.")
_not_built("export", "ONNX export of one SEFP model plus GPTQ/AWQ and fixed-precision variants.")
_not_built("run", "generate with the torch-free runtime at a chosen precision, switching on the fly.")
_not_built("profile", "latency and memory per bit-width per device.")


def main():
    cli(prog_name="otaro")


if __name__ == "__main__":
    main()
