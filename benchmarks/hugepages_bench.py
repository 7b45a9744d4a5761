"""Decode speed of the runtime with its weights on 2 MiB transparent huge pages vs 4 KiB pages.

`Runtime.load(huge_pages=True)` (the default) collapses the mappings each build created into
2 MiB pages (otaro.runtime.hugepages); `huge_pages=False` leaves them on 4 KiB pages. The two
cannot share a process: the kernel's huge-page mark stays on a heap once set, so weights a later
build puts there would be huge either way. So each measurement is its own process, and the two
settings alternate, process after process (R times each; medians), so machine drift hits both.

Each process loads the head benchmark's fused artifact (8-bit SEFP head) at b, then runs the
engines benchmark's round (128-token prefill, 64 greedy tokens after a 128-token context) a few
times and reports its median decode tokens/s, plus AnonHugePages from /proc/self/smaps_rollup.

Writes benchmarks/results/hugepages.json/.png and the `hugepages` section of RESULTS.md.
Usage: python benchmarks/hugepages_bench.py [--threads N] [--reps R] [--bits 2,4,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish, save_figure  # noqa: E402

ROUNDS_PER_PROCESS = 3

_PROBE = r"""
import json, statistics, sys
sys.path.insert(0, sys.argv[1])
import engines_bench as eb
from otaro.evaluation.data import read_text
from otaro.runtime import Runtime
art, bits, threads, huge = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
import time
rt = Runtime.load(art, threads=threads, bits=bits, cache_bytes=0, verify=False, huge_pages=huge)
t = time.perf_counter()
rt.wait_for_huge_pages()  # the move runs in the background after the build
collapse_s = time.perf_counter() - t
_, text = read_text("corpus:brown-eval")
prompt = rt.encode(text[:20000])[:max(eb.CTX, eb.PROMPT)]
eb.ort_round(rt.decoder, prompt)  # warm-up
tps = [eb.ort_round(rt.decoder, prompt)["decode_tps"] for _ in range(%d)]
huge_kb = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
rss_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps({"decode_tps": statistics.median(tps), "anon_huge_kb": huge_kb, "rss_kb": rss_kb,
                  "switch_s": rt.last_switch.seconds, "collapse_s": collapse_s}))
""" % ROUNDS_PER_PROCESS


def probe(art: Path, bits: int, threads: int, huge: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(HERE), str(art), str(bits), str(threads), "1" if huge else "0"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unavailable"


def measure(args) -> dict:
    import platform

    import onnxruntime as ort

    from head_bench import build as build_artifact, work_dir
    from otaro.evaluation.run import machine_info

    _, art, _ = build_artifact("head 8", 8, work_dir(), args.threads, graph="fused")
    got = {(b, h): [] for b in args.bits for h in (True, False)}
    for i in range(args.reps):
        for b in args.bits:
            for h in ((True, False) if i % 2 == 0 else (False, True)):  # alternate which goes first
                got[(b, h)].append(probe(art, b, args.threads, h))
        print(f"rep {i + 1}/{args.reps}: " + ", ".join(
            f"b={b} {'2M' if h else '4K'} {v[-1]['decode_tps']:.0f}" for (b, h), v in got.items()), flush=True)
    info = machine_info()
    info.update(onnxruntime=ort.__version__, kernel=platform.release(), thp=thp_mode())
    rows = []
    for b in args.bits:
        huge, small = got[(b, True)], got[(b, False)]
        rows.append({"bits": b,
                     "huge_tps": statistics.median(r["decode_tps"] for r in huge),
                     "small_tps": statistics.median(r["decode_tps"] for r in small),
                     "huge_runs": [r["decode_tps"] for r in huge], "small_runs": [r["decode_tps"] for r in small],
                     "huge_anon_huge_mib": statistics.median(r["anon_huge_kb"] for r in huge) / 1024,
                     "small_anon_huge_mib": statistics.median(r["anon_huge_kb"] for r in small) / 1024,
                     "huge_rss_mib": statistics.median(r["rss_kb"] for r in huge) / 1024,
                     "small_rss_mib": statistics.median(r["rss_kb"] for r in small) / 1024,
                     "huge_load_s": statistics.median(r["switch_s"] for r in huge),
                     "small_load_s": statistics.median(r["switch_s"] for r in small),
                     "collapse_s": statistics.median(r["collapse_s"] for r in huge)})
    return {"machine": info, "threads": args.threads, "reps": args.reps, "rounds_per_process": ROUNDS_PER_PROCESS,
            "rows": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        "## Weights on 2 MiB huge pages vs 4 KiB pages (`benchmarks/hugepages_bench.py`)",
        "",
        f"Command: `python benchmarks/hugepages_bench.py --threads {res['threads']} --reps {res['reps']}`. Machine: "
        f"{m['processor']}, {m['cpus']} CPUs, Linux {m['kernel']} (transparent huge pages: `{m['thp']}`), onnxruntime "
        f"{m['onnxruntime']}, {res['threads']} thread(s), spinning. The head benchmark's fused artifact (8-bit SEFP head) "
        "loaded at b by `Runtime.load(huge_pages=True)` (the default: after each build the mappings it created are "
        "collapsed into 2 MiB pages, `otaro.runtime.hugepages`) or `huge_pages=False`. One process per measurement "
        "(the kernel's huge-page mark stays on a heap once set), the two settings alternating process after process; "
        f"each process runs the engines benchmark's decode ({res['rounds_per_process']} rounds after a warm-up, median: "
        "64 greedy tokens after 128 tokens of context). Medians over the processes.",
        "",
        "| b | decode tok/s, 2 MiB pages | 4 KiB pages | speed-up | processes min–max (2 MiB / 4 KiB) | "
        "AnonHugePages MiB (2 MiB / 4 KiB) | RSS MiB (2 MiB / 4 KiB) | build at load s (2 MiB / 4 KiB) | "
        "background move s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['bits']} | {r['huge_tps']:.1f} | {r['small_tps']:.1f} | {r['huge_tps'] / r['small_tps']:.2f}× | "
            f"{min(r['huge_runs']):.0f}–{max(r['huge_runs']):.0f} / {min(r['small_runs']):.0f}–{max(r['small_runs']):.0f} | "
            f"{r['huge_anon_huge_mib']:.0f} / {r['small_anon_huge_mib']:.0f} | {r['huge_rss_mib']:.0f} / "
            f"{r['small_rss_mib']:.0f} | {r['huge_load_s']:.2f} / {r['small_load_s']:.2f} | {r.get('collapse_s', 0):.2f} |")
    out += [
        "",
        "Read: a decode step streams every weight once; on 4 KiB pages that is a TLB miss every 4 KiB (~22,000 per "
        "token at b = 4). numpy already puts the master bytes on huge pages (the 4 KiB column's AnonHugePages); the "
        "collapse adds onnxruntime's prepacked weights. RSS is the same: the collapse moves pages, it does not add "
        "any. `build at load` is the first build (derive, pack, session); the move to huge pages runs after it on a "
        "background thread (`background move`: how long `Runtime.wait_for_huge_pages()` then waited; the decode "
        "rounds start after it). The first move of a process is the longest (all its weights are new mappings; "
        "after a switch, the new weights partly land in memory already marked, which the kernel backs with huge "
        "pages as they are written).",
        "",
        "![hugepages](results/hugepages.png)",
    ]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([i - 0.2 for i in x], [r["small_tps"] for r in rows], 0.4, label="4 KiB pages", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r["huge_tps"] for r in rows], 0.4, label="2 MiB pages (default)", color="tab:blue")
    ax.set_xticks(list(x), [f"b = {r['bits']}" for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"SmolLM2-135M, otaro runtime, {res['threads']} thread(s)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8],
                    help="bit-widths to load at, comma-separated (default 2,4,8)")
    ap.add_argument("--reps", type=int, default=5, help="processes per setting and b")
    ap.add_argument("--threads", type=int, default=2)
    print(publish("hugepages", measure(ap.parse_args()), plot, markdown))


if __name__ == "__main__":
    main()
