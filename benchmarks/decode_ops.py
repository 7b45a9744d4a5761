"""Where a decode token goes in the otaro runtime, by onnxruntime op type (SmolLM2-135M).

Where the time of a decode step goes decides what to optimise next (issue 12 started with the
runtime 2.1-2.5x slower than llama.cpp on the same weights, and b = 2 barely faster than b = 4).
This script loads the head benchmark's artifact (RTN, the default SEFP format, 8-bit
head, --graph fused by default; built there and reused) with
``Runtime.load(..., profile=)``, runs a 128-token prefill and --new greedy decode steps per b,
and sums onnxruntime's per-node kernel times of the decode steps by op type
(``otaro.runtime.optrace``). Reported per b: wall ms per step, the summed kernel ms, the time
between kernels (run time - kernel time: scheduling and per-node dispatch), nodes executed per
step, and the ops by share. Profiling itself adds per-node cost, so the wall time here is above
the unprofiled decode of the engines benchmark; the shares are what this script is for.

Writes benchmarks/results/decode_ops.json, decode_ops.png and the `decode_ops` section of
benchmarks/RESULTS.md. Usage: python benchmarks/decode_ops.py [--threads N] [--new N] [--bits 2,4,8]
[--graph fused|traced] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish  # noqa: E402

# The weight matmuls and the ops that do the model's arithmetic; everything else a decode step
# runs computes shapes, indices, masks or moves data (Shape, Gather, Unsqueeze, Concat, ...).
COMPUTE_OPS = {"MatMulNBits", "MatMul", "FusedMatMul", "Softmax", "SimplifiedLayerNormalization", "GroupQueryAttention",
               "SkipSimplifiedLayerNormalization", "QuickGelu", "Sigmoid", "Mul", "Add", "Div", "Neg",
               "Sqrt", "Pow", "ReduceMean", "Tanh", "Erf"}
TOP = 12


def measure(art: Path, bits: int, threads: int, new: int, prompt: list[int], work: Path) -> dict:
    from otaro.runtime import Runtime
    from otaro.runtime.optrace import op_breakdown, read_trace
    from runtime_bench import time_round

    plain = Runtime.load(art, bits=bits, threads=threads, accuracy_level=4, verify=False)
    plain.wait_for_huge_pages()  # the weights' move to huge pages runs in the background
    time_round(plain.decoder, prompt, 4)  # warm-up
    plain_ms = statistics.median(1000 / time_round(plain.decoder, prompt, new)[1] for _ in range(3))
    del plain
    rt = Runtime.load(art, bits=bits, threads=threads, accuracy_level=4, verify=False,
                      profile=work / f"b{bits}")
    rt.wait_for_huge_pages()
    time_round(rt.decoder, prompt, new)
    (trace,) = rt.end_profiling()
    b = op_breakdown(read_trace(trace), skip=1)  # the prefill left out
    trace.unlink()
    compute = sum(o.ms_per_run for o in b.ops if o.op in COMPUTE_OPS)
    matmul = sum(o.ms_per_run for o in b.ops if o.op == "MatMulNBits")
    return {"bits": bits, "steps": b.runs, "plain_ms": plain_ms, "run_ms": b.run_ms, "kernel_ms": b.kernel_ms,
            "between_ms": b.between_kernels_ms, "nodes": b.nodes_per_run, "matmulnbits_ms": matmul,
            "other_compute_ms": compute - matmul, "shape_data_ms": b.kernel_ms - compute,
            "ops": [{"op": o.op, "ms": o.ms_per_run, "nodes": o.nodes_per_run, "share": o.share} for o in b.ops]}


def run(args) -> dict:
    import onnxruntime as ort

    from tokenizers import Tokenizer

    from head_bench import build, work_dir
    from otaro.errors import OtaroError
    from otaro.evaluation.data import read_text
    from otaro.evaluation.run import machine_info

    if args.artifact:
        art = Path(args.artifact)
        if not (art / "otaro_artifact.json").is_file():
            raise OtaroError(f"{art} is not an otaro artifact (no otaro_artifact.json)")
    else:
        _, art, _ = build("head 8", 8, work_dir(), args.threads, graph=args.graph)
    _, text = read_text("corpus:brown-eval")
    prompt = Tokenizer.from_file(str(art / "tokenizer.json")).encode(text[:4000]).ids[:128]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="otaro-ops-") as tmp:
        rows = [measure(art, b, args.threads, args.new, prompt, Path(tmp)) for b in args.bits]
    m = machine_info()
    try:
        manifest = json.loads((art / "otaro_artifact.json").read_text())
        method = manifest["source"]["method"]
        head = manifest.get("head") or {}
        what = (f"an artifact of {method['name']} / {method['config'].get('format')} "
                f"(head {head.get('bits', 'float')}-bit)")
    except (OSError, ValueError, KeyError, TypeError):
        what = "artifact"
    what = (f"the head benchmark's RTN artifact (8-bit head, {args.graph} graph)" if not args.artifact else what)
    return {"artifact": what, "graph": None if args.artifact else args.graph, "rows": rows, "threads": args.threads, "new": args.new, "prompt_tokens": len(prompt),
            "seconds": time.perf_counter() - t0, "onnxruntime": ort.__version__,
            "machine": {k: m[k] for k in ("processor", "cpus", "python", "otaro") if k in m}}


def trend(low: dict, high: dict) -> str:
    if low is high:
        return ""
    return (f"From b = {high['bits']} to b = {low['bits']} the matmuls go {high['matmulnbits_ms']:.1f} → "
            f"{low['matmulnbits_ms']:.1f} ms and the unprofiled step {high['plain_ms']:.1f} → {low['plain_ms']:.1f} ms. ")


def verdict(matmul_share: float) -> str:
    """What the measured share says to optimise (not a fixed conclusion: it follows the numbers)."""
    if matmul_share < 0.5:
        return ("Most of a step is not the weight matmuls: the lever is the graph (the optimum-traced decoder "
                "computes shapes, rotary and masks node by node; a fused decoder with GroupQueryAttention and "
                "SkipSimplifiedLayerNormalization, as onnxruntime-genai's model builder emits, runs ~10 nodes per "
                "layer), not the kernels.")
    return ("The weight matmuls are most of a step here: what is left is kernel speed and bytes per weight "
            "(the 8-bit head is the same at every b), then the per-node cost of the rest.")


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [
        "## Where a decode token goes: onnxruntime op types in the otaro runtime (`benchmarks/decode_ops.py`)",
        "",
        f"Command: `python benchmarks/decode_ops.py --threads {r['threads']} --new {r['new']}"
        f"{' --graph ' + r['graph'] if r.get('graph') else ''}`. Machine: "
        f"{m.get('processor')}, {m.get('cpus')} CPUs, onnxruntime {r['onnxruntime']}, {r['threads']} thread(s). "
        f"SmolLM2-135M, {r['artifact']}; a "
        f"{r['prompt_tokens']}-token prefill, then {r['new']} greedy steps profiled by onnxruntime "
        "(`Runtime.load(..., profile=)`; profiling adds per-node cost, so wall times sit above the engines "
        "benchmark's: each node's timing costs microseconds, which land between kernels and on the small "
        "kernels; the unprofiled step time is measured beside it, 3 rounds, median).",
        "",
        "| b | unprofiled ms/step | profiled wall ms/step | kernels ms | between kernels ms | MatMulNBits ms | other compute ms | "
        "shape/index/data ops ms | nodes/step | MatMulNBits ÷ unprofiled step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        out.append(f"| {x['bits']} | {x['plain_ms']:.2f} | {x['run_ms']:.2f} | {x['kernel_ms']:.2f} | {x['between_ms']:.2f} | "
                   f"{x['matmulnbits_ms']:.2f} | {x['other_compute_ms']:.2f} | {x['shape_data_ms']:.2f} | "
                   f"{x['nodes']:.0f} | {100 * x['matmulnbits_ms'] / x['plain_ms']:.0f}% |")
    ref = next((x for x in r["rows"] if x["bits"] == 4), r["rows"][0])
    out += ["", f"Top op types at b = {ref['bits']} (ms per step, nodes per step, share of kernel time):", "",
            "| op | ms | nodes | share |", "|---|---|---|---|"]
    for o in ref["ops"][:TOP]:
        out.append(f"| {o['op']} | {o['ms']:.3f} | {o['nodes']:.0f} | {100 * o['share']:.1f}% |")
    low, high = min(r["rows"], key=lambda x: x["bits"]), max(r["rows"], key=lambda x: x["bits"])
    fixed = ref["plain_ms"] - ref["matmulnbits_ms"]
    out += ["",
            f"Read: at b = {ref['bits']} the weight matmuls' kernels take {ref['matmulnbits_ms']:.1f} ms, "
            f"{100 * ref['matmulnbits_ms'] / ref['plain_ms']:.0f}% of an unprofiled {ref['plain_ms']:.1f} ms step; the "
            f"other {fixed:.1f} ms is everything else over {ref['nodes']:.0f} nodes per token (profiled: "
            f"{ref['shape_data_ms']:.1f} ms of shape/index/data nodes, {ref['other_compute_ms']:.1f} ms of other "
            f"arithmetic, {ref['between_ms']:.1f} ms between kernels, all inflated by the profiler). "
            + trend(low, high) + verdict(ref["matmulnbits_ms"] / ref["plain_ms"]),
            "", "![decode ops](results/decode_ops.png)"]
    return "\n".join(out)


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from otaro.io import atomic_file

    rows = r["rows"]
    parts = [("matmulnbits_ms", "MatMulNBits (weights)"), ("other_compute_ms", "other arithmetic"),
             ("shape_data_ms", "shape / index / data ops"), ("between_ms", "between kernels")]
    # bars: the profiled step by part; the marker: the same step unprofiled
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    x = [str(row["bits"]) for row in rows]
    bottom = [0.0] * len(rows)
    for key, label in parts:
        vals = [row[key] for row in rows]
        ax.bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(x, [row["plain_ms"] for row in rows], "k_", ms=40, mew=2, label="unprofiled step")
    ax.set_xlabel("bits (b)")
    ax.set_ylabel("ms per decode step (profiled)")
    ax.set_title("otaro runtime, SmolLM2-135M: where a decode step goes")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64, help="profiled decode steps per b (default 64)")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--graph", choices=("fused", "traced"), default="fused",
                    help="the default artifact's decoder graph (default fused: the runtime's default for llama)")
    ap.add_argument("--artifact", help="an otaro ONNX artifact of SmolLM2-135M (default: build the head benchmark's "
                                       "RTN artifact, 8-bit head, in the cache)")
    args = ap.parse_args()
    try:
        args.bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        ap.error(f"--bits: a comma list of integers, got {args.bits!r}")
    from otaro.errors import OtaroError

    try:
        result = run(args)
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    print(publish("decode_ops", result, plot, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
