"""The profile report: its schema, its tables (markdown, also what the terminal shows), its plot.

``profile.json`` is checked against :data:`REPORT_SCHEMA` before it is written (and by the
tests), so readers (benchmarks/profile_bench.py, a dashboard) can rely on every field.
"""

from __future__ import annotations

from pathlib import Path

from otaro.errors import OtaroError
from otaro.manifest_schema import NONNEG_INT, NUMBER, POS_INT, ListOf, Opt, check

STATS = {"median": NUMBER, "min": NUMBER, "max": NUMBER, "mean": NUMBER, "stdev": NUMBER, "spread": NUMBER,
         "values": ListOf(NUMBER)}
BYTES = {"codes": NUMBER, "scales": NUMBER, "folded": NUMBER, "float": NUMBER, "gather": NUMBER, "kv": NUMBER,
         "total": NUMBER}
FOOTPRINT = {"runtime": NONNEG_INT, "fixed": NONNEG_INT, "kv": NONNEG_INT, "packed": NONNEG_INT}
PRED_ROW = {"bits": int, "container_bits": (int, None), "decode_tps": NUMBER, "memory_bound_tps": NUMBER,
            "compute_bound_tps": (NUMBER, None), "bound": str, "prefill_s": (NUMBER, None), "bytes_per_token": BYTES,
            "footprint": FOOTPRINT, "fits": (bool, None)}
PREDICTION = {"device": str, "title": str, "backend": str, "containers": ListOf(int), "bandwidth_gbs": NUMBER,
              "bandwidth_uncertain": bool, "bandwidth_source": str, "memory_gib": NUMBER, "compute_kind": str,
              "peak_tops": (NUMBER, None), "peak_uncertain": (bool, None), "measured": bool,
              "rows": ListOf(PRED_ROW)}
ARTIFACT = {"path": str, "format": str, "bits": ListOf(int), "default_bits": int, "layers": POS_INT,
            "quantized_params": POS_INT, "float_read_bytes": NONNEG_INT, "kv_bytes_per_position": NONNEG_INT,
            "disk_bytes": POS_INT, "master_bytes": NONNEG_INT}
MEASURED_ROW = {
    "bits": int, "container_bits": (int, None), "switch_s": NUMBER, "switch_cached": bool, "derive_s": NUMBER,
    "session_s": NUMBER, "switch_extra_bytes": NONNEG_INT, "switch_peak_rss_bytes": (NONNEG_INT, None),
    "prefill_s": STATS, "ttft_s": STATS, "decode_tps": STATS, "peak_rss_bytes": (NONNEG_INT, None),
    "rss_bytes": (NONNEG_INT, None), "bytes_per_token": BYTES, "footprint": FOOTPRINT,
    "roofline_tps": (NUMBER, None), "roofline_fraction": (NUMBER, None), "predicted_decode_tps": (NUMBER, None),
    "predicted_prefill_s": (NUMBER, None), "prediction_error": (NUMBER, None),
}
MATRIX = ListOf(ListOf((NUMBER, None)))
SWITCH = {"bits": ListOf(int), "walk": ListOf(int), "cold_s": MATRIX, "warm_s": MATRIX,
          "cold_detail": ListOf({"from": int, "to": int, "seconds": NUMBER, "derive_s": NUMBER, "session_s": NUMBER,
                                 "cached": bool}),
          "cold_median_s": (NUMBER, None), "warm_median_s": (NUMBER, None)}
FILE_ROW = {"bits": int, "kind": str, "source": str, "disk_bytes": POS_INT, "container_bits": (int, None),
            "load_warm_s": Opt(NUMBER), "load_cold_s": Opt(NUMBER), "cold_evicted": Opt(bool)}
COMPETITORS = {"files": ListOf(FILE_ROW),
               "disk": {"artifact_bytes": POS_INT, "per_bit_total_bytes": NONNEG_INT, "per_bit_bits": ListOf(int),
                        "ratio": NUMBER},
               "work_dir": (str, None),
               "llama_bench": {"status": str, "note": str, "rows": ListOf(dict)}}
BANDWIDTH = {"read_gbs": NUMBER, "copy_gbs": NUMBER, "read_runs_gbs": ListOf(NUMBER), "working_set_bytes": POS_INT,
             "threads": POS_INT, "repeats": POS_INT, "matmul_gflops": (NUMBER, None), "matmul_n": (int, None)}
REPORT_SCHEMA = {
    "otaro_profile": int, "mode": str, "created": str, "artifact": ARTIFACT, "config": dict, "machine": dict,
    "predictions": ListOf(PREDICTION), "notes": ListOf(str),
    "seconds": Opt(NUMBER), "bandwidth": Opt((BANDWIDTH, None)), "device": Opt((dict, None)),
    "rows": Opt(ListOf(MEASURED_ROW)), "switch": Opt((SWITCH, None)), "competitors": Opt((COMPETITORS, None)),
    "beside": Opt((PREDICTION, None)),
    "decode_fit": Opt(({"bandwidth_gbs": (NUMBER, None), "overhead_s": NUMBER, "r2": NUMBER, "points": POS_INT}, None)),
}


class ReportError(OtaroError):
    pass


def validate_report(report: dict) -> dict:
    check(report, REPORT_SCHEMA, "profile report", ReportError)
    if report["mode"] not in ("measured", "predicted"):
        raise ReportError(f"profile report: mode {report['mode']!r} is not 'measured' or 'predicted'")
    if report["mode"] == "measured":
        for k in ("rows", "bandwidth", "switch", "competitors", "beside"):
            if k not in report:
                raise ReportError(f"profile report: a measured report needs {k!r}")
        if not report["rows"]:
            raise ReportError("profile report: a measured report has no rows")
    return report


# --------------------------------------------------------------------------- text


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _ms(s) -> str:
    return "—" if s is None else f"{s * 1e3:.1f}" if s >= 1e-3 else f"{s * 1e3:.2g}"


def _num(x, fmt="{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _tps(x) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _pct(x) -> str:
    return "—" if x is None else f"{x:+.0%}"


def _gib(n) -> str:
    return f"{n / 2**30:.2f}" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def measured_tables(r: dict) -> list[str]:
    c = r["config"]
    a = r["artifact"]
    m = r["machine"]
    bw = r["bandwidth"]
    out = [f"Measured on this machine: {m['cpu']}, {m['cpus']} CPUs, onnxruntime {m['onnxruntime']} "
           f"({c['backend']}, {c['threads']} threads, accuracy_level {c['accuracy_level']}); prompt {c['prompt_len']} "
           f"tokens, {c['gen_len']} generated, {c['warmup']} warm-up + {c['repeats']} repeats per bit-width. "
           f"Load average {m.get('load_average_start')} at the start, {m.get('load_average_end')} at the end."]
    if bw:
        mm = f"; fp32 matmul {bw['matmul_gflops']:.0f} GFLOPS" if bw.get("matmul_gflops") else ""
        out.append(f"Memory bandwidth (measured now): read {bw['read_gbs']:.2f} GB/s, copy {bw['copy_gbs']:.2f} GB/s "
                   f"({bw['working_set_bytes'] / 2**30:g} GiB working set, {bw['threads']} threads, best of "
                   f"{bw['repeats']}){mm}.")
    be = r.get("beside")
    pred_label = (f"predicted tok/s ({be['device']}, {be['bandwidth_gbs']:.3g} GB/s)" if be else "predicted tok/s")
    out += ["", f"| b | container | prefill ms | TTFT ms | decode tok/s median [min–max] | {pred_label} | measured vs "
                f"predicted | roofline used | MB read/token | peak RSS MiB | switch s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        d = row["decode_tps"]
        out.append(f"| {row['bits']} | {row['container_bits'] or 'fp32'} | {_ms(row['prefill_s']['median'])} | "
                   f"{_ms(row['ttft_s']['median'])} | {d['median']:.1f} [{d['min']:.1f}–{d['max']:.1f}] | "
                   f"{_num(row['predicted_decode_tps'])} | {_pct(row['prediction_error'])} | "
                   f"{_num(row['roofline_fraction'], '{:.0%}')} | {row['bytes_per_token']['total'] / 1e6:.1f} | "
                   f"{_mib(row['peak_rss_bytes'])} | {row['switch_s']:.2f} |")
    fit = r.get("decode_fit")
    if fit and fit["bandwidth_gbs"]:
        out += ["", f"Fit across the bit-widths, seconds per token = bytes / bandwidth + overhead: the decode loop gets "
                    f"{fit['bandwidth_gbs']:.2f} GB/s from the weights plus {fit['overhead_s'] * 1e3:.2f} ms per token "
                    f"that does not scale with them (R² {fit['r2']:.2f}, {fit['points']} byte counts)."]
    sw = r.get("switch")
    if sw and len(sw["bits"]) > 1:
        bits = sw["bits"]
        out += ["", f"Switch latency from a precision (row) to another (column): cold = nothing cached (derive + pack "
                    f"+ session, s); warm = cached (µs). Median cold {sw['cold_median_s']:.3f} s, warm "
                    f"{sw['warm_median_s'] * 1e6:.0f} µs.", "",
                "| from \\ to | " + " | ".join(f"{b} cold / warm" for b in bits) + " |",
                "|---" * (len(bits) + 1) + "|"]
        for i, frm in enumerate(bits):
            cells = ["—" if i == j else f"{sw['cold_s'][i][j]:.2f} / {sw['warm_s'][i][j] * 1e6:.0f} µs"
                     for j in range(len(bits))]
            out.append(f"| {frm} | " + " | ".join(cells) + " |")
    comp = r.get("competitors")
    if comp:
        ours = {row["bits"]: row for row in r["rows"]}
        out += ["", "The competitors' way (llama.cpp, onnxruntime-genai, ExecuTorch): one file per precision, "
                    "switch = a new onnxruntime session on another file.", "",
                "| b | file | disk MiB | reload warm s | reload cold s | otaro switch into b, cold s (median) | otaro switch, warm |",
                "|---|---|---|---|---|---|---|"]
        warm_med = sw["warm_median_s"] if sw else None
        into = {}  # median cold switch into each b, from the matrix (the per-bit row's one switch otherwise)
        if sw and len(sw["bits"]) > 1:
            import statistics

            for j, b in enumerate(sw["bits"]):
                into[b] = statistics.median(row[j] for i, row in enumerate(sw["cold_s"]) if i != j)
        for f in comp["files"]:
            o = ours.get(f["bits"]) if f["kind"] == "per-bit SEFP file" else None
            if o:
                o = dict(o, switch_s=into.get(f["bits"], o["switch_s"]))
            cold = f.get("load_cold_s")
            cold_txt = _num(cold, "{:.2f}") + ("" if f.get("cold_evicted", True) else " (cache not evictable)")
            out.append(f"| {f['bits']} | {f['kind']} ({f['source']}) | {_mib(f['disk_bytes'])} | "
                       f"{_num(f.get('load_warm_s'), '{:.2f}')} | {cold_txt if 'load_cold_s' in f else '—'} | "
                       f"{_num(o['switch_s'], '{:.2f}') if o else '—'} | "
                       f"{_num(warm_med * 1e6, '{:.0f} µs') if o and warm_med is not None else '—'} |")
        d = comp["disk"]
        out += ["", f"Disk: the one SEFP artifact {_mib(d['artifact_bytes'])} MiB (every bit-width "
                    f"{','.join(map(str, a['bits']))}) vs per-bit files for b = {','.join(map(str, d['per_bit_bits']))}: "
                    f"{_mib(d['per_bit_total_bytes'])} MiB ({d['ratio']:.2f}×)."]
        lb = comp["llama_bench"]
        if lb["rows"]:
            out += ["", "| llama-bench (same weights, GGUF) | disk MiB | prefill tok/s | decode tok/s |", "|---|---|---|---|"]
            for x in lb["rows"]:
                out.append(f"| {x.get('model_type') or x['gguf']} | {_mib(x.get('disk_bytes'))} | "
                           f"{_num(x.get('prefill_tps'))} | {_num(x.get('decode_tps'))} |")
        out += ["", f"llama-bench: {lb['status']} — {lb['note']}."]
    return out


def prediction_tables(preds: list[dict]) -> list[str]:
    if not preds:
        return []
    bits = [row["bits"] for row in preds[0]["rows"]]
    out = ["", "**Predicted** decode tokens/s (roofline from the device profile, not measured; `~` = a derived or "
               "unofficial number; container bits in brackets):", "",
           "| device | backend | GB/s | " + " | ".join(f"b={b}" for b in bits) + " | bound | prefill ms (b="
           f"{bits[-1]}) | runtime footprint GiB (b={bits[-1]}) | memory GiB | fits |",
           "|---" * (len(bits) + 8) + "|"]
    for p in preds:
        rows = p["rows"]
        last = rows[-1]
        fits = {r["fits"] for r in rows}
        fit = "yes" if fits == {True} else "no" if fits == {False} else "?" if None in fits else "some b"
        bwl = ("~" if p["bandwidth_uncertain"] else "") + f"{p['bandwidth_gbs']:g}"
        cells = [f"{_tps(r['decode_tps'])} [{r['container_bits'] or 'fp32'}]" for r in rows]
        out.append(f"| {p['device']} | {p['backend']} | {bwl} | " + " | ".join(cells) + f" | "
                   f"{'/'.join(sorted({r['bound'] for r in rows}))} | {_ms(last['prefill_s'])} | "
                   f"{last['footprint']['runtime'] / 2**30:.2f} | {p['memory_gib']:g} | {fit} |")
    return out


def render(report: dict) -> str:
    a = report["artifact"]
    head = [f"otaro profile of {a['path']} ({a['format']}, {a['layers']} quantized linears, "
            f"{a['quantized_params'] / 1e6:.1f} M quantized weights; disk {_mib(a['disk_bytes'])} MiB)", ""]
    body = measured_tables(report) if report["mode"] == "measured" else []
    body += prediction_tables(report.get("predictions") or [])
    notes = ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(head + body + notes)


# --------------------------------------------------------------------------- plot


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = report["mode"] == "measured"
    preds = report.get("predictions") or []
    panels = int(measured) + int(bool(preds)) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    axes = list(axes) if panels > 1 else [axes]
    if measured:
        a1 = axes.pop(0)
        rows = report["rows"]
        x = [r["bits"] for r in rows]
        med = [r["decode_tps"]["median"] for r in rows]
        err = [[m - r["decode_tps"]["min"] for m, r in zip(med, rows)],
               [r["decode_tps"]["max"] - m for m, r in zip(med, rows)]]
        a1.errorbar(x, med, yerr=err, fmt="o-", capsize=3, label="measured (median, min–max)")
        if all(r["roofline_tps"] for r in rows):
            a1.plot(x, [r["roofline_tps"] for r in rows], "k--",
                    label=f"roofline: {report['bandwidth']['read_gbs']:.1f} GB/s ÷ bytes/token")
        be = report.get("beside")
        if be and be["device"] != "this-machine":
            a1.plot([r["bits"] for r in be["rows"]], [r["decode_tps"] for r in be["rows"]], "s:",
                    label=f"predicted ({be['device']})")
        a1.set(title="decode tokens/s vs bits (batch 1), this machine", xlabel="bits", ylabel="tokens/s")
        a1.set_ylim(bottom=0)
        a1.legend(fontsize=7)
    if preds:
        a2 = axes.pop(0)
        for p in preds:
            a2.plot([r["bits"] for r in p["rows"]], [r["decode_tps"] for r in p["rows"]], "o:", ms=3,
                    label=p["device"])
        a2.set_yscale("log")
        a2.set(title="predicted decode tokens/s (roofline, upper bound)", xlabel="bits", ylabel="tokens/s")
        a2.legend(fontsize=6)
    a3 = axes.pop(0)
    rows = report["rows"] if measured else preds[0]["rows"]
    x = [r["bits"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (("codes", "quantized codes"), ("scales", "fp32 scales"), ("folded", "folded fp32 weights"),
                       ("float", "float tensors (LM head, norms)"), ("gather", "embedding row"), ("kv", "KV cache")):
        vals = [r["bytes_per_token"][key] / 1e6 for r in rows]
        if any(vals):
            a3.bar(x, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
    where = report["config"].get("backend") or (preds[0]["backend"] if preds else "")
    a3.set(title=f"bytes read per decoded token ({where})", xlabel="bits", ylabel="MB / token")
    a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, folder: str | Path) -> tuple[Path, Path]:
    """profile.json and profile.png in ``folder`` (validated first)."""
    from otaro.io import write_json

    validate_report(report)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "profile.json", report)
    plot(report, folder / "profile.png")
    return folder / "profile.json", folder / "profile.png"
