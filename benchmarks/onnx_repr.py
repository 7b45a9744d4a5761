"""Speed and exactness of each ONNX form of one SEFP-quantized linear on onnxruntime CPU.

Rows, timed side by side in one run (every round runs every session, in random order): fp32 MatMul;
the ``ai.otaro`` model-local SEFP function with ``sefp_bits`` a constant initializer (ORT folds the
code derivation and fuses DQ+MatMul into MatMulNBits) at accuracy level 4 and 1, b = 2..8;
``com.microsoft.MatMulNBits`` in the smallest container at level 4 and 1; the function with
``sefp_bits`` fed at run time (nothing folds), b = 4. Plus the session-creation time of the function
vs MatMulNBits at b = 4: the cost of switching precision by re-creating a session.

Writes benchmarks/results/onnx_repr.json, benchmarks/results/onnx_repr.png and the `onnx_repr`
section of benchmarks/RESULTS.md. Usage: python benchmarks/onnx_repr.py [--size 2048] [--rounding trunc]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish  # noqa: E402

from otaro.formats import SEFPFormat, sefp  # noqa: E402
from otaro.formats import onnx_ops as ox  # noqa: E402
from otaro.formats.pack import sefp_to_matmulnbits  # noqa: E402

GROUP, THREADS, MS, ACCS, SWITCH_BITS = 64, 2, (1, 64), (4, 1), 4
FP32, FUNC, NBITS, RUNTIME = "fp32 MatMul", "SEFP function, bits constant", "MatMulNBits", "SEFP function, bits fed at run time"


def machine_info() -> dict:
    from otaro import __version__

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "otaro": __version__}


def make_model(K: int, N: int, nodes, inits: dict, funcs=(), extra_inputs=()) -> bytes:
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "layer", [vi("X", TensorProto.FLOAT, ["M", K]), *extra_inputs],
                          [vi("Y", TensorProto.FLOAT, ["M", N])],
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", ox.OPSET), helper.make_opsetid(ox.DOMAIN, 1), helper.make_opsetid(ox.MS_DOMAIN, 1)]
    m = helper.make_model(g, functions=list(funcs), ir_version=ox.IR_VERSION, opset_imports=opsets)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def session(blob: bytes, acc: int | None, optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    if acc is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(acc))
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def optimized_graph(blob: bytes, acc: int | None) -> tuple[str, int | None]:
    """What ORT made of the model (a short summary) and the MatMulNBits container it runs, if any."""
    with tempfile.TemporaryDirectory() as d:
        session(blob, acc, os.path.join(d, "opt.onnx"))
        nodes = onnx.load(os.path.join(d, "opt.onnx")).graph.node
    nb = [n for n in nodes if n.op_type == "MatMulNBits"]
    bits = next((a.i for a in nb[0].attribute if a.name == "bits"), None) if nb else None
    if len(nodes) == 1:
        return (f"MatMulNBits ({bits}-bit)" if nb else nodes[0].op_type), bits
    return f"{len(nodes)} nodes: {'+'.join(dict.fromkeys(n.op_type for n in nodes))}", bits


def build_rows(K: int, N: int, rounding: str, seed: int) -> list[dict]:
    W = (np.random.default_rng(seed).standard_normal((N, K)) * 0.02).astype(np.float32)
    fmt = SEFPFormat(GROUP, rounding)
    t = sefp.encode(W, fmt)
    mant, scale8 = ox.sefp_initializers(t)
    func_node, funcs = ox.sefp_node(fmt, "X", "mant", "scale8", "Y", "sefp"), [ox.sefp_function(fmt)]

    def row(rep, b, acc, inits, blob, session_acc=None, feed=None):
        ref = W if b is None else sefp.decode(t, b)
        return {"rep": rep, "b": b, "acc": acc, "blob": blob, "session_acc": session_acc, "feed": feed or {},
                "ref": ref.astype(np.float64), "bytes_per_weight": sum(v.nbytes for v in inits.values()) / (K * N)}

    inits = {"W": np.ascontiguousarray(W.T)}
    rows = [row(FP32, None, None, inits, make_model(K, N, [helper.make_node("MatMul", ["X", "W"], ["Y"])], inits))]
    for b in range(2, 9):
        inits = {"mant": mant, "scale8": scale8, ox.BITS_INPUT: np.array(b, np.int64)}
        blob = make_model(K, N, [func_node], inits, funcs)
        rows += [row(FUNC, b, acc, inits, blob, session_acc=acc) for acc in ACCS]
        if fmt.container_bits(b) is None:
            continue
        B, scales, c = sefp_to_matmulnbits(t, b)
        inits = {"B": B, "S": scales}
        for acc in ACCS:
            node = ox.matmulnbits_node("X", "B", "S", "Y", "nbits", K=K, N=N, bits=c, block_size=GROUP, accuracy_level=acc)
            rows.append(row(NBITS, b, acc, inits, make_model(K, N, [node], inits)))
    inits = {"mant": mant, "scale8": scale8}
    bits_in = helper.make_tensor_value_info(ox.BITS_INPUT, TensorProto.INT64, [])
    rows.append(row(RUNTIME, SWITCH_BITS, None, inits, make_model(K, N, [func_node], inits, funcs, [bits_in]),
                    feed={ox.BITS_INPUT: np.array(SWITCH_BITS, np.int64)}))
    return rows


def prepare(r: dict, xs: dict, min_ms: float) -> None:
    """Inspect the optimized graph, open the session, warm up, check exactness, pick runs per sample."""
    r["graph"], r["container"] = optimized_graph(r["blob"], r["session_acc"])
    r["sess"], r["n"], r["max_rel_err"] = session(r["blob"], r["session_acc"]), {}, 0.0
    for M in MS:
        feed = {"X": xs[M], **r["feed"]}
        for _ in range(3):
            y = r["sess"].run(None, feed)[0]
        t0 = time.perf_counter()
        r["sess"].run(None, feed)
        r["n"][M] = max(1, int(min_ms / 1e3 / (time.perf_counter() - t0)))
        ref = xs[M].astype(np.float64) @ r["ref"].T
        r["max_rel_err"] = max(r["max_rel_err"], float(np.abs(y - ref).max() / np.abs(ref).max()))


def time_rows(rows: list[dict], xs: dict, rounds: int, seed: int) -> None:
    """Per row and M: median over interleaved rounds of the mean time of back-to-back runs."""
    samples = [{M: [] for M in MS} for _ in rows]
    order = np.random.default_rng(seed)
    for _ in range(rounds):
        for i in order.permutation(len(rows)):
            for M in MS:
                feed, n = {"X": xs[M], **rows[i]["feed"]}, rows[i]["n"][M]
                t0 = time.perf_counter()
                for _ in range(n):
                    rows[i]["sess"].run(None, feed)
                samples[i][M].append((time.perf_counter() - t0) / n * 1e3)
    for r, s in zip(rows, samples):
        r["ms"] = {M: float(np.median(v)) for M, v in s.items()}
        r["spread"] = float(np.median([np.subtract(*np.percentile(v, [75, 25])) / np.median(v) for v in s.values()]))


def creation_times(rows: list[dict], reps: int) -> list[dict]:
    """Session creation from the serialized model at b = SWITCH_BITS, function vs MatMulNBits, interleaved."""
    picked = [r for r in rows if r["rep"] in (FUNC, NBITS) and r["b"] == SWITCH_BITS]
    times = [[] for _ in picked]
    for _ in range(reps):
        for r, ts in zip(picked, times):
            t0 = time.perf_counter()
            session(r["blob"], r["session_acc"])
            ts.append((time.perf_counter() - t0) * 1e3)
    return [{"rep": r["rep"], "b": r["b"], "acc": r["acc"], "ms": float(np.median(ts)), "decode_ms": r["ms"][1]}
            for r, ts in zip(picked, times)]


def run(args) -> dict:
    t0, machine = time.perf_counter(), machine_info()
    rng = np.random.default_rng(args.seed + 1)
    xs = {M: rng.standard_normal((M, args.size)).astype(np.float32) for M in MS}
    rows = build_rows(args.size, args.size, args.rounding, args.seed)
    for r in rows:
        prepare(r, xs, args.min_ms)
    time_rows(rows, xs, args.rounds, args.seed)
    create = creation_times(rows, args.create_reps)
    fp = rows[0]["ms"]
    keep = ("rep", "b", "container", "acc", "graph", "max_rel_err", "bytes_per_weight", "spread")
    out = [{**{k: r[k] for k in keep}, "ms": {str(M): r["ms"][M] for M in MS}, "runs_per_sample": {str(M): r["n"][M] for M in MS},
            "ratio": {str(M): r["ms"][M] / fp[M] for M in MS}} for r in rows]
    return {"args": vars(args), "machine": machine, "rows": out, "creation": create, "seconds": time.perf_counter() - t0}


def span(vals, f="{:.3g}") -> str:
    lo, hi = f.format(min(vals)), f.format(max(vals))
    return lo if lo == hi else f"{lo}–{hi}"


def how_to_read(res: dict) -> list[str]:
    rows, fp = res["rows"], res["rows"][0]

    def pick(rep, acc, **kw):
        return [r for r in rows if r["rep"] == rep and r["acc"] == acc and all(r[k] == v for k, v in kw.items())]

    def ms1(rs):
        return span([r["ms"]["1"] for r in rs])

    best = min(rows[1:], key=lambda r: r["ms"]["1"])
    f4, n4, f1, n1 = pick(FUNC, 4), pick(NBITS, 4), pick(FUNC, 1), pick(NBITS, 1)
    rt = next(r for r in rows if r["rep"] == RUNTIME)
    out = [(f"- Fastest decode step (M = 1): {best['rep']}, b = {best['b']}, level {best['acc']}: {best['ms']['1']:.3g} ms = "
            f"{best['ratio']['1']:.2f}× fp32 ({fp['ms']['1']:.3g} ms).")]
    pairs = [(f, n) for f in f4 for n in n4 if f["b"] == n["b"]]
    per_b = [f["ms"]["1"] / n["ms"]["1"] for f, n in pairs]
    same = [(f["b"], f["ms"]["1"] / n["ms"]["1"]) for f, n in pairs if f["container"] == n["container"]]
    out.append(f"- Level 4: the function with constant bits becomes {' / '.join(dict.fromkeys(r['graph'] for r in f4))} for every b "
               f"and takes {ms1(f4)} ms at M = 1 ({span([r['ratio']['1'] for r in f4], '{:.2f}')}× fp32); direct MatMulNBits in the "
               f"smallest container takes {ms1(n4)} ms; function / direct at the same b: median {np.median(per_b):.2f}×"
               + (f" (b = {span([b for b, _ in same], '{}')} run the same container in both, so their ratios, "
                  f"{span([q for _, q in same], '{:.2f}')}, show the noise)." if same else "."))
    lvl1 = [f"{c}-bit {ms1(pick(NBITS, 1, container=c))} ms" for c in sorted({r["container"] for r in n1})]
    out.append(f"- Level 1 (fp32 activations): function {ms1(f1)} ms at M = 1; direct MatMulNBits {', '.join(lvl1)} "
               f"(fp32: {fp['ms']['1']:.3g} ms).")
    quant = [r["max_rel_err"] for r in f4 + n4 if r["container"]]  # level 4 only matters inside MatMulNBits
    exact = [r["max_rel_err"] for r in f1 + n1 + f4 + n4 + [rt] if r["container"] is None or r["acc"] == 1]
    out.append(f"- Exactness vs `sefp.decode`: max rel. error ≤ {max(exact):.1e} with fp32 activations (level 1, or no "
               f"MatMulNBits: float rounding only)" + (f", {span(quant, '{:.1e}')} in MatMulNBits at level 4 (activations "
                                                          "quantized to int8 per block)." if quant else "."))
    fold = pick(FUNC, 4, b=rt["b"])
    out.append(f"- Bits fed at run time: ORT keeps {rt['graph']}; {rt['ms']['1']:.3g} ms at M = 1 = {rt['ratio']['1']:.1f}× fp32"
               + (f", {rt['ms']['1'] / fold[0]['ms']['1']:.2g}× the folded function at level 4." if fold else "."))
    cr = {(c["rep"], c["acc"]): c for c in res["creation"]}
    if (FUNC, 4) in cr and (NBITS, 4) in cr:
        a, b = cr[FUNC, 4], cr[NBITS, 4]
        out.append(f"- Switching precision by re-creating the session (b = {a['b']}, level 4, this one layer): {a['ms']:.0f} ms "
                   f"for the function vs {b['ms']:.0f} ms for MatMulNBits, ≈ {a['ms'] / a['decode_ms']:.0f} and "
                   f"{b['ms'] / b['decode_ms']:.0f} of their decode steps.")
    bpw = {r["container"]: r["bytes_per_weight"] for r in n4}
    out.append(f"- Storage: the function model holds every b in {f4[0]['bytes_per_weight']:.4f} B/weight (int8 mantissa + fp32 "
               f"scale8 per {GROUP}); MatMulNBits holds one b in " + ", ".join(f"{v:.4f} ({c}-bit)" for c, v in bpw.items()) + ".")
    out.append(f"- Noise: round-to-round interquartile range / median is {100 * np.median([r['spread'] for r in rows]):.0f}% "
               f"(median over rows); load average {res['machine']['load_avg_1min']} at start.")
    return out


def intro(res: dict) -> list[str]:
    a, m = res["args"], res["machine"]
    cmd = (f"python benchmarks/onnx_repr.py --size {a['size']} --rounding {a['rounding']} --rounds {a['rounds']} "
           f"--min-ms {a['min_ms']:g} --create-reps {a['create_reps']} --seed {a['seed']}")
    return [f"## ONNX forms of one SEFP linear on onnxruntime CPU ({a['size']}×{a['size']}, g{GROUP}, `{a['rounding']}`)", "",
            (f"Produced by `{cmd}` in {res['seconds']:.0f} s on {m['processor']}, {m['cpus']} CPUs ({m['platform']}); "
             f"python {m['python']}, numpy {m['numpy']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, otaro {m['otaro']}."),
            (f"One linear Y = X·Wᵀ, W ~ N(0, 0.02²) of shape [{a['size']}, {a['size']}] encoded by `sefp.encode`; "
             f"CPUExecutionProvider, {THREADS} intra-op threads, default graph optimizations. Each time is the median over "
             f"{a['rounds']} rounds (every session once per round, random order) of the mean of back-to-back runs lasting "
             f"≥ {a['min_ms']:g} ms, after warm-up. Level = `session.qdq_matmulnbits_accuracy_level` for the function rows, "
             "the node's `accuracy_level` for MatMulNBits. ORT graph = the optimized graph ORT saves. Max rel. err = "
             "`max|Y − X·W_bᵀ| / max|X·W_bᵀ|` over M = 1 and 64 with W_b = `sefp.decode(t, b)` in float64 (fp32 row: W). "
             "B/weight = bytes of all initializers / (K·N)."), ""]


def markdown(res: dict) -> str:
    a = res["args"]

    def cell(v) -> str:
        return "—" if v is None else str(v)

    out = [*intro(res),
           "| representation | b | container | level | ORT graph | ms M=1 | ms M=64 | ×fp32 M=1 | ×fp32 M=64 | max rel. err | B/weight |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['rep']} | {cell(r['b'])} | {cell(r['container'])} | {cell(r['acc'])} | {r['graph']} | {r['ms']['1']:.3g} | "
            f"{r['ms']['64']:.3g} | {r['ratio']['1']:.2f} | {r['ratio']['64']:.2f} | {r['max_rel_err']:.1e} | "
            f"{r['bytes_per_weight']:.4f} |" for r in res["rows"]]
    out += ["", f"Session creation from the serialized model (median of {a['create_reps']}):", "",
            "| representation | b | level | ms | = decode steps (M=1) |", "|---|---|---|---|---|"]
    out += [f"| {c['rep']} | {c['b']} | {c['acc']} | {c['ms']:.1f} | {c['ms'] / c['decode_ms']:.0f} |" for c in res["creation"]]
    out += ["", "How to read (sentences generated from the numbers above):", "", *how_to_read(res), "",
            "![decode-step time per b for each ONNX form](results/onnx_repr.png)"]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from otaro.io import atomic_file

    rows = res["rows"]
    fig, axes = plt.subplots(1, len(MS), figsize=(6.5 * len(MS), 5.2), dpi=120)
    for ax, M in zip(axes, MS):
        ax.axhline(rows[0]["ms"][str(M)], color="k", ls="--", lw=1, label=FP32)
        for rep, acc, style in [(FUNC, 4, "-o"), (FUNC, 1, ":o"), (NBITS, 4, "-s"), (NBITS, 1, ":s")]:
            pts = [r for r in rows if r["rep"] == rep and r["acc"] == acc]
            name = f"{rep} (smallest container)" if rep == NBITS else rep
            ax.plot([r["b"] for r in pts], [r["ms"][str(M)] for r in pts], style, ms=5, label=f"{name}, level {acc}")
        for r in (r for r in rows if r["rep"] == RUNTIME):
            ax.plot([r["b"]], [r["ms"][str(M)]], "r*", ms=11, label=r["rep"])
        ax.set(yscale="log", xlabel="b (SEFP bits)", ylabel="ms per run (log)",
               title=f"{'decode step' if M == 1 else 'prefill chunk'}, M = {M}, {res['args']['size']}² linear, {THREADS} threads")
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 5)))
        for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_fmt(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="K = N of the linear (default 2048)")
    ap.add_argument("--rounding", default="trunc", choices=["trunc", "nearest", "midpoint"], help="SEFP decode (default trunc)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    ap.add_argument("--min-ms", type=float, default=30.0, help="minimum duration of one timing sample in ms (default 30)")
    ap.add_argument("--create-reps", type=int, default=5, help="session creations per row for the switch cost (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weight (the input uses seed + 1)")
    args = ap.parse_args()

    print(publish("onnx_repr", run(args), plot, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
