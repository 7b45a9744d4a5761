"""The quantized LM head and embedding (``--head-bits``) on SmolLM2-135M: quality and decode speed,
side by side with the float head in the same run.

SmolLM2-135M's tied 49152x576 head is 113 MB in fp32: most of what a decode step reads at 2-4
bits. Two RTN checkpoints of the default SEFP format, identical except for the head:
  * ``head 8``: head and embedding stored as SEFP codes, the head at 8 bits (the default);
  * ``head fp32``: ``--head-bits float`` (what every checkpoint was before).
Measured:
  * KL divergence to the fp32 model, top-1 agreement and perplexity at b = 2, 3, 4, 8
    (brown-eval and austen, `otaro eval`'s metrics; goal: KLD at b = 8 with the 8-bit head
    <= 1.2x the KLD with the fp32 head);
  * decode tokens/s at b = 2, 4, 8 and prefill of a 128-token prompt through the runtime,
    interleaved A/B (head 8, head fp32, head 8, ...) so machine load hits both alike; file
    bytes; peak RSS of a process that loads the artifact and generates at b = 4.

Writes benchmarks/results/head.json, head.png and the `head` section of benchmarks/RESULTS.md.
Usage: python benchmarks/head_bench.py [--threads N] [--reps R] [--windows W]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish  # noqa: E402
from runtime_bench import time_round as time_decoder  # noqa: E402 - one greedy round, timed

MODEL = "smollm2-135m"
EVAL_BITS = (2, 3, 4, 8)
SPEED_BITS = (2, 4, 8)
TEXTS = ("corpus:brown-eval", "corpus:austen")
HEADS = {"head 8": 8, "head fp32": None}


def work_dir() -> Path:
    from otaro.assets import cache_dir

    d = cache_dir() / "bench" / "head"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(name: str, head_bits, root: Path, threads: int, graph: str = "traced") -> tuple[Path, Path, float]:
    """(checkpoint, artifact, export seconds); reused when already built. ``graph``: the
    exporter's --graph (this benchmark's published numbers are the traced graph's)."""
    from otaro.export.artifact import ExportConfig, export
    from otaro.formats import DEFAULT_SEFP
    from otaro.quantize import QuantizeConfig, quantize

    tag = name.replace(" ", "-")
    ck, art = root / f"ck-{tag}", root / (f"art-{tag}" + ("" if graph == "traced" else f"-{graph}"))
    if not (ck / "otaro.json").is_file():
        quantize(QuantizeConfig(MODEL, str(ck), format=DEFAULT_SEFP, head_bits=head_bits, overwrite=True))
    t = 0.0
    if not (art / "otaro_artifact.json").is_file():
        t0 = time.perf_counter()
        # The quantized head's artifact is validated against torch at every b (the real-model
        # check of the new Gather/MatMul path); the float one is the already-validated layout.
        export(ExportConfig(ck, art, validate=head_bits is not None, overwrite=True, threads=threads, graph=graph),
               progress=lambda s: print(f"  {name}: {s}", flush=True))
        t = time.perf_counter() - t0
    return ck, art, t


def quality(windows: int, threads: int) -> dict:
    """KLD/top-1/ppl rows per head; kept in the work folder (keyed by the settings), so a re-run
    for new speed numbers does not score the texts again."""
    from otaro.evaluation.run import EvalConfig, run_eval
    from otaro.formats import DEFAULT_SEFP

    cached = work_dir() / f"quality-w{windows}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    out = {}
    for name, hb in HEADS.items():
        print(f"eval {name}", flush=True)
        r = run_eval(EvalConfig(MODEL, TEXTS, bits=EVAL_BITS, formats=(DEFAULT_SEFP,), baseline=False,
                                max_windows=windows, threads=threads, head_bits=hb), show_progress=False)
        out[name] = [{k: row[k] for k in ("dataset", "bits", "kld", "kld_p99", "top1", "ppl")} for row in r["rows"]]
        out["machine"] = r["machine"]
    from otaro.io import write_json

    write_json(cached, out)
    return out


def iobinding_decoder(session):
    """A Decoder that keeps the KV cache in onnxruntime's buffers between steps (IOBinding:
    present OrtValues fed back as the next past), as onnxruntime-genai does: the candidate
    against the runtime's numpy hand-off, measured side by side below."""
    import numpy as np

    from otaro.runtime.decoder import Decoder

    class IOBindingDecoder(Decoder):
        def forward(self, input_ids, attention_mask, past, rows=None):
            b = self.session.io_binding()
            feeds = self._feeds(input_ids, attention_mask, None if rows is None else np.asarray(rows, np.int64))
            for name, v in feeds.items():
                b.bind_cpu_input(name, v)
            for name, v in past.items():
                if isinstance(v, np.ndarray):
                    b.bind_cpu_input(name, v)
                else:
                    b.bind_ortvalue_input(name, v)
            for name in self._outputs:
                b.bind_output(name, "cpu")
            self.session.run_with_iobinding(b)
            out = b.get_outputs()
            return self._pick(out[0].numpy(), rows), dict(zip(self.io.past_names, out[1:]))

    return IOBindingDecoder(session)


_RSS_PROBE = r"""
import json, sys
from otaro.runtime import Runtime
rt = Runtime.load(sys.argv[1], threads=int(sys.argv[2]), bits=4, cache_bytes=0, verify=False)
rt.generate(list(range(100, 164)), max_new_tokens=16)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_rss": hwm}))
"""


def speed(arts: dict[str, Path], threads: int, reps: int, prompt_tokens: int, new: int) -> dict:
    from otaro.evaluation.data import read_text
    from otaro.runtime import Runtime

    rts = {n: Runtime.load(a, threads=threads, accuracy_level=4, cache_bytes=2 << 30, verify=False)
           for n, a in arts.items()}
    _, text = read_text("corpus:brown-eval")
    prompt = next(iter(rts.values())).encode(text[:20000])[:prompt_tokens]
    rows = []
    for b in SPEED_BITS:
        for rt in rts.values():
            rt.set_precision(b)
            time_decoder(rt.decoder, prompt, 8)  # warm-up round, dropped
        got = {n: ([], []) for n in rts}
        for _ in range(reps):  # interleaved A/B: load drifts hit both engines alike
            for n, rt in rts.items():
                p, tps = time_decoder(rt.decoder, prompt, new)
                got[n][0].append(p)
                got[n][1].append(tps)
        for n, (p, tps) in got.items():
            rows.append({"model": n, "bits": b, "prefill_s": statistics.median(p), "decode_tps": statistics.median(tps)})
            print(f"  {n} b={b}: decode {rows[-1]['decode_tps']:.1f} tok/s, prefill {rows[-1]['prefill_s'] * 1e3:.0f} ms",
                  flush=True)
    # The KV hand-off: the runtime's numpy round trip vs IOBinding, same session, interleaved.
    rt = rts["head 8"]
    rt.set_precision(4)
    decs = {"numpy (runtime)": rt.decoder, "IOBinding": iobinding_decoder(rt.decoder.session)}
    handoff = {n: [] for n in decs}
    for d in decs.values():
        time_decoder(d, prompt, 8)
    for _ in range(reps):
        for n, d in decs.items():
            handoff[n].append(time_decoder(d, prompt, new)[1])
    handoff = {n: statistics.median(v) for n, v in handoff.items()}
    print(f"  KV hand-off at b=4: {handoff}", flush=True)
    del rts, rt, decs
    files, rss = {}, {}
    for n, a in arts.items():
        files[n] = sum(p.stat().st_size for p in a.iterdir() if p.name.startswith("model.onnx"))
        r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(a), str(threads)], capture_output=True, text=True,
                           check=True)
        rss[n] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]
    return {"rows": rows, "file_bytes": files, "peak_rss": rss, "prompt_tokens": len(prompt), "new_tokens": new,
            "kv_handoff_tps": handoff}


def measure(args) -> dict:
    import onnxruntime

    root = work_dir()
    arts, export_s = {}, {}
    for name, hb in HEADS.items():
        print(f"building {name}", flush=True)
        _, arts[name], export_s[name] = build(name, hb, root, args.threads)
    man = json.loads((arts["head 8"] / "otaro_artifact.json").read_text())
    validation = [{"bits": r["bits"], "passed": r["passed"], "max_abs_diff": r["max_abs_diff"]}
                  for r in man["validation"].get("results", [])]
    q = quality(args.windows, args.threads)
    s = speed(arts, args.threads, args.reps, args.prompt_tokens, args.new_tokens)
    machine = q.pop("machine")
    machine["onnxruntime"] = onnxruntime.__version__
    return {"machine": machine, "threads": args.threads, "reps": args.reps, "windows": args.windows,
            "quality": q, "speed": s, "validation": validation, "head": man.get("head")}


def _mean(rows, name, b, key):
    vals = [r[key] for r in rows if r["bits"] == b]
    return sum(vals) / len(vals)


def markdown(res: dict) -> str:
    m, q, s = res["machine"], res["quality"], res["speed"]
    a, f = "head 8", "head fp32"
    out = [
        "## Quantized LM head and embedding on SmolLM2-135M (`benchmarks/head_bench.py`)",
        "",
        f"Command: `python benchmarks/head_bench.py --threads {res['threads']} --reps {res['reps']} --windows "
        f"{res['windows']}`. Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, {res['threads']} thread(s). Two RTN checkpoints of the default SEFP format that differ "
        "only in the head: `head 8` stores the tied head/embedding as SEFP codes with the head at 8 bits (the "
        "default of `otaro quantize`/`finetune`), `head fp32` is `--head-bits float` (every checkpoint before).",
        "",
        "### Fidelity to the fp32 model (mean over brown-eval and austen)",
        "",
        "| b | KLD head 8 | KLD head fp32 | ratio | top-1 head 8 | top-1 head fp32 | ppl head 8 | ppl head fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in EVAL_BITS:
        ka, kf = _mean(q[a], a, b, "kld"), _mean(q[f], f, b, "kld")
        out.append(f"| {b} | {ka:.4f} | {kf:.4f} | {ka / kf:.2f} | {100 * _mean(q[a], a, b, 'top1'):.1f}% | "
                   f"{100 * _mean(q[f], f, b, 'top1'):.1f}% | {_mean(q[a], a, b, 'ppl'):.2f} | {_mean(q[f], f, b, 'ppl'):.2f} |")
    rows = {(r["model"], r["bits"]): r for r in s["rows"]}
    out += [
        "",
        f"### Decode through the runtime ({s['prompt_tokens']}-token prompt, {s['new_tokens']} greedy tokens, "
        f"accuracy_level 4, medians of {res['reps']} interleaved A/B rounds)",
        "",
        "| b | decode tok/s head 8 | decode tok/s head fp32 | speed-up | prefill ms head 8 | prefill ms head fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for b in SPEED_BITS:
        ra, rf = rows[(a, b)], rows[(f, b)]
        out.append(f"| {b} | {ra['decode_tps']:.1f} | {rf['decode_tps']:.1f} | {ra['decode_tps'] / rf['decode_tps']:.2f}× | "
                   f"{ra['prefill_s'] * 1e3:.0f} | {rf['prefill_s'] * 1e3:.0f} |")
    fb, rss = s["file_bytes"], s["peak_rss"]
    out += [
        "",
        f"Files (model.onnx + data): head 8 {fb[a] / 2**20:.0f} MiB, head fp32 {fb[f] / 2**20:.0f} MiB "
        f"({fb[a] / fb[f]:.2f}×). Peak RSS of a process that loads the artifact and generates at b = 4: "
        f"head 8 {rss[a] / 2**20:.0f} MiB, head fp32 {rss[f] / 2**20:.0f} MiB.",
        "",
    ]
    h = s.get("kv_handoff_tps")
    if h:
        out += [f"KV cache hand-off between steps at b = 4 (same session, interleaved): numpy round trip "
                f"{h['numpy (runtime)']:.1f} tok/s, IOBinding with the presents fed back as OrtValues {h['IOBinding']:.1f} "
                f"tok/s ({h['IOBinding'] / h['numpy (runtime)']:.2f}×).", ""]
    val = res["validation"]
    if val:
        worst = max(v["max_abs_diff"] for v in val)
        out.append(f"Export validation of the `head 8` artifact against torch (stock onnxruntime, exact mode): "
                   f"{sum(v['passed'] for v in val)}/{len(val)} bit-widths passed, max |Δlogit| {worst:.1e}.")
        out.append("")
    k8 = _mean(q[a], a, 8, "kld") / _mean(q[f], f, 8, "kld")
    b4 = rows[(a, 4)]["decode_tps"] / rows[(f, 4)]["decode_tps"]
    b2 = rows[(a, 2)]["decode_tps"] / rows[(a, 4)]["decode_tps"]
    out += [
        "Against the goals (issue 12):",
        f"- KLD at b = 8 with the 8-bit head: {k8:.2f}× the fp32 head's (goal ≤ 1.2×) "
        f"{'✓' if k8 <= 1.2 else '✗'}.",
        f"- decode at b = 4: {b4:.2f}× the float-head model; b = 2 is {b2:.2f}× b = 4 with the 8-bit head "
        f"(goal ≥ 1.3×) {'✓' if b2 >= 1.3 else '✗'}.",
        "",
        "![head](results/head.png)",
    ]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, s = res["quality"], res["speed"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("head 8", "o-"), ("head fp32", "s--")):
        ax1.plot(EVAL_BITS, [_mean(q[name], name, b, "kld") for b in EVAL_BITS], style, label=name)
    ax1.set_yscale("log")
    ax1.set_xlabel("bits (decoder linears)")
    ax1.set_ylabel("KLD to fp32 (nats/token)")
    ax1.set_title("fidelity")
    ax1.legend()
    width = 0.38
    for i, name in enumerate(("head 8", "head fp32")):
        vals = [next(r["decode_tps"] for r in s["rows"] if r["model"] == name and r["bits"] == b) for b in SPEED_BITS]
        ax2.bar([j + (i - 0.5) * width for j in range(len(SPEED_BITS))], vals, width, label=name)
    ax2.set_xticks(range(len(SPEED_BITS)), [str(b) for b in SPEED_BITS])
    ax2.set_xlabel("bits")
    ax2.set_ylabel("decode tokens/s")
    ax2.set_title(f"runtime decode, {res['threads']} thread(s)")
    ax2.legend()
    fig.suptitle("SmolLM2-135M: 8-bit SEFP head vs fp32 head")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--windows", type=int, default=3, help="evaluation windows per text")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--replot", action="store_true", help="rewrite the section from results/head.json")
    args = ap.parse_args()
    if args.replot:
        res = json.loads((HERE / "results" / "head.json").read_text())
    else:
        res = measure(args)
    print(publish("head", res, plot, markdown))


if __name__ == "__main__":
    main()
