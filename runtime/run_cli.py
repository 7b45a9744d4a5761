"""``otaro run``: generate with the torch-free runtime, one-shot or interactive.

Generated text goes to stdout as it comes; everything else (load, switch and speed lines) goes
to stderr, so ``otaro run ART --prompt ... > out.txt`` keeps only the text. Only click is
imported here at module level: ``otaro --help`` must not pay for onnxruntime.
"""

from __future__ import annotations

import sys

import click

HELP_LINE = "commands: /bits N (or PATTERN=N,...) switches precision, /bits shows it, /quit leaves"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _switch_line(report) -> str:
    if report.cached:
        return f"precision {report.spec} (warm, {report.seconds * 1e3:.1f} ms)"
    return (f"precision {report.spec} (switched in {report.seconds:.2f} s: derive+pack {report.derive_seconds:.2f} s, "
            f"session {report.session_seconds:.2f} s, +{_mib(report.extra_bytes)})")


def _info(msg: str) -> None:
    click.echo(msg, err=True)


def _generate(rt, prompt, options: dict) -> object:
    stream = rt.stream(prompt, **options)
    for chunk in stream:
        click.echo(chunk, nl=False)
    click.echo()
    g = stream.result
    _info(f"[{len(g.token_ids)} tokens in {g.seconds:.2f} s, {g.tokens_per_second:.1f} tokens/s "
          f"(prefill {g.prefill_seconds * 1e3:.0f} ms), precision {g.precision}, finish: {g.finish_reason}]")
    return g


def _interactive(rt, options: dict, chat: bool) -> None:
    from otaro.errors import OtaroError
    from otaro.runtime.switch import parse_precision

    stdin = sys.stdin  # CliRunner swaps it in tests
    tty = stdin.isatty()
    _info(HELP_LINE)
    history: list[dict] = []
    while True:
        if tty:
            click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line:  # end of input
            return
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/quit", "/exit"):
                    return
                if cmd != "/bits":
                    _info(f"unknown command {cmd}; {HELP_LINE}")
                elif arg.strip():
                    _info(_switch_line(rt.set_precision(parse_precision(arg))))
                else:
                    _info(f"precision {rt.active_precision.label}")
                continue
            if chat:
                messages = history + [{"role": "user", "content": line}]
                g = _generate(rt, messages, options)
                history = messages + [{"role": "assistant", "content": g.text}]
            else:
                _generate(rt, line, options)
        except OtaroError as e:  # a bad line must not end the session; the runtime stays usable
            _info(f"error: {e}")


@click.command(name="run")
@click.argument("artifact", type=click.Path())
@click.option("--bits", "bits", help="Precision: a bit-width (2-8) or per layer 'PATTERN=B,...' such as "
                                      "'*=4,layers.0.*=8' [default: the artifact's].")
@click.option("--prompt", help="Generate once from this prompt and exit [default: an interactive session].")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample among the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Sample within this probability mass.")
@click.option("--seed", type=int, help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--chat", is_flag=True, help="Apply the artifact's chat template (interactive: keep the conversation).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime threads [default: all cores].")
@click.option("--accuracy-level", type=click.IntRange(0, 4),
              help="MatMulNBits accuracy_level: 4 = int8 activations (fast), 1 = exact [default: the artifact's].")
@click.option("--warm", "warm", multiple=True, metavar="BITS",
              help="Build this precision at load too (repeatable, e.g. --warm 4 --warm 8), so `/bits` to it is "
                   "instant instead of a session build (0.3-0.5 s on SmolLM2-135M).")
def run(artifact, bits, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, device, threads,
        accuracy_level, warm):
    """Generate text with an exported ARTIFACT at any precision, switching on the fly.

    One stored model serves every bit-width: the b-bit weights are derived from the 8-bit
    mantissas when you switch (`/bits N` in the interactive session), without reading the
    files again. Prints tokens/s and the precision after each answer.

    \b
    Examples:
      otaro run art --bits 4 --prompt "The weather"
      otaro run art --chat                       # then: /bits 3, a question, /quit
    """
    import time

    from otaro.runtime import Runtime
    from otaro.runtime.switch import parse_precision

    t0 = time.perf_counter()
    # One prompt and out: moving the weights to huge pages in the background would compete with
    # that one answer for the cores (~0.1-0.2 s on SmolLM2, 2 cores) and gain only after it is
    # done. An interactive session moves them while the user types.
    rt = Runtime.load(artifact, device=device, threads=threads, accuracy_level=accuracy_level,
                      bits=parse_precision(bits) if bits else None, warm=[parse_precision(w) for w in warm],
                      huge_pages=prompt is None)
    _info(f"loaded {artifact} in {time.perf_counter() - t0:.2f} s ({len(rt.layers)} layers, bits "
          f"{','.join(map(str, rt.bits_available))}, {rt.backend.backend}, accuracy_level "
          f"{rt.backend.accuracy_level}); {_switch_line(rt.last_switch)}")
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop=tuple(stop))
    if prompt is None:
        _interactive(rt, options, chat)
    else:
        _generate(rt, [{"role": "user", "content": prompt}] if chat else prompt, options)
