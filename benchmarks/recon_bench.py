"""Block reconstruction (SB, LA-2, MB-2 with SignRound; LSI) against RTN and GPTQ, on SmolLM2-135M.

Judged as benchmarks/quality.py judges (its helpers are imported): per-token KL divergence from
the fp32 model, top-1 agreement and perplexity, over the same windows of Brown k-r and Jane
Austen, the reference log-probs computed once per text. Calibration: Brown a-j (``brown-train``).

Rows: per-bit integer models int{2,3,4}-g128-asym (the int4-g128-asym family) and one
ssfp-g64-nearest model per method (every b from one stored code, the reconstruction targets
``--targets``), each by rtn, gptq, sb, la (n = 2), mb (n = 2), lsi and qslaw (group scale factors
trained on the LM loss of the calibration text). Quantization time is
recorded per row. Every (row) result is cached under ~/.cache/otaro/bench/recon, so a rerun
resumes where it stopped.

Cost: a SignRound row runs --iters steps of --recon-batch (8) window forward+backward passes per
block and per target bit-width (LA-2/MB-2 through two blocks): hours per row on a 2-core CPU at
the defaults. Size it with --iters, --calib-samples, --methods, or run it on a GPU.

Goal printed ✓/✗ per format: at 3 bits the best reconstruction method's KLD ≤ 0.7× RTN's.

Writes benchmarks/results/recon.json, benchmarks/results/recon.png and the ``recon`` section of
benchmarks/RESULTS.md. ``--dry-run`` runs every row on a tiny random model and a paragraph of
text in seconds, writes nothing but prints the table (a smoke test of the script itself).

Usage: python benchmarks/recon_bench.py [--iters N] [--calib-samples N] [--max-windows N] [--dry-run]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (benchmarks/quality.py: Row, Cache, evaluate, mean_over_texts)

MODEL = quality.MODEL
TEXTS = quality.TEXTS
CALIB = quality.CALIB
INT_BITS = (2, 3, 4)
SEFP = "ssfp-g64-nearest"
SEFP_BITS = (2, 3, 4, 8)  # 8: what the low-bit targets cost the top precision
METHODS = ("rtn", "gptq", "sb", "la", "mb", "lsi", "qslaw")
RECON = ("sb", "la", "mb", "lsi", "qslaw")
LABELS = {"rtn": "RTN", "gptq": "GPTQ", "sb": "SB", "la": "LA-2", "mb": "MB-2", "lsi": "LSI", "qslaw": "QSLAW"}
# QSLAW's CPU-sized defaults; the cache key names them only when changed (rows measured before
# QSLAW joined the benchmark keep their key)
QSLAW_DEFAULTS = {"qslaw_steps": 30, "qslaw_batch": 2}
GOAL_BITS, GOAL_RATIO = 3, 0.7


def plan(args) -> list[quality.Row]:
    rows = []
    for m in args.methods:
        for b in args.int_bits:
            rows.append(quality.Row(f"int-g128-asym {LABELS[m]}", m, f"int{b}-g128-asym", False, (b,)))
        targets = args.targets if m not in ("rtn",) else ""
        rows.append(quality.Row(f"{SEFP} {LABELS[m]}", m, SEFP, True, SEFP_BITS, targets=targets))
    return rows


class Cache(quality.Cache):
    """quality.py's row cache, in its own folder."""

    def __init__(self, key: str, enabled: bool = True):
        self.path = Path.home() / ".cache" / "otaro" / "bench" / "recon" / f"{key}.json"
        self.data = json.loads(self.path.read_text()) if enabled and self.path.exists() else {}
        self.enabled = enabled

    def put(self, row, value) -> None:
        if self.enabled:
            super().put(row, value)
        else:
            self.data[quality.row_key(row)] = value


def method_options(method: str, args, calib_specs=()) -> dict:
    """The QuantizeConfig fields a row's method takes from the flags."""
    if method in ("sb", "la", "mb"):
        return {"recon_iters": args.iters, "recon_batch": args.recon_batch,
                **({"recon_blocks": 2} if method != "sb" else {})}
    if method == "lsi":
        return {"lsi_epochs": args.lsi_epochs, "lsi_k": args.lsi_k}
    if method == "qslaw":
        # the scale factors trained on the LM loss of the calibration text only (η = steps): the
        # only other text here is an evaluation text, which must not be trained on
        return {"qslaw_data": tuple(calib_specs), "qslaw_steps": args.qslaw_steps, "qslaw_warmup": args.qslaw_steps,
                "qslaw_batch_size": args.qslaw_batch, "qslaw_seq_len": args.calib_len}
    return {}


def quantize(row, src, calib, args, model_name: str, calib_specs):
    import torch

    from otaro.formats import get_format
    from otaro.methods import get_method
    from otaro.quantize import QuantizeConfig

    method = get_method(row.method)
    # the config validates an output folder that must not exist; nothing is written there
    cfg = QuantizeConfig(model=model_name, output=str(Path(tempfile.gettempdir()) / "otaro-recon-unused"),
                         method=row.method, format=row.fmt, calib=calib_specs if method.needs_calibration else (),
                         calib_samples=args.calib_samples, calib_len=args.calib_len, bits=row.targets or (),
                         **method_options(row.method, args, calib_specs))
    data = calib if method.needs_calibration else None
    if method.read_data is not None:  # qslaw reads its own task rows
        data = method.read_data(src, cfg)
    with torch.no_grad():  # the reconstruction methods turn gradients on for their own steps
        return method.run(copy.deepcopy(src.model), get_format(row.fmt), cfg, data, None)


def _dry_inputs(tmp: Path):
    """A tiny random llama and a text file of the tokenizer's own paragraph (--dry-run)."""
    from otaro.arch.tiny import SAMPLE_TEXT

    text = tmp / "sample.txt"
    text.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    return "tiny-llama", (str(text),), (str(text),)


def run(args) -> dict:
    import torch

    from otaro.evaluation import reference as refs
    from otaro.evaluation.data import make_windows, read_text
    from otaro.evaluation.run import machine_info
    from otaro.methods.calib import calibration_windows
    from otaro.progress import progress
    from otaro.sources import load_source

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="otaro-recon-"))
    model_name, texts, calib_specs = (_dry_inputs(tmp) if args.dry_run else (MODEL, TEXTS, CALIB))
    machine = machine_info()
    print(f"machine: {machine['processor']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch threads; "
          f"python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
          f"otaro {machine['otaro']}", flush=True)
    src = load_source(model_name)
    max_pos = getattr(src.model.config, "max_position_embeddings", None)
    windows = [make_windows(src.tokenizer, text, args.seq_len, args.max_windows, label, max_pos)
               for label, text in (read_text(t) for t in texts)]
    calib = calibration_windows(src.tokenizer, list(calib_specs), args.calib_samples, args.calib_len, seed=0,
                                max_positions=max_pos)
    key = hashlib.sha256(json.dumps([model_name, args.seq_len, args.max_windows, args.calib_samples, args.calib_len,
                                     args.iters, args.lsi_epochs, args.lsi_k, args.targets]
                                    + ([args.recon_batch] if args.recon_batch != 8 else [])
                                    + [[k, getattr(args, k)] for k, d in QSLAW_DEFAULTS.items()
                                       if getattr(args, k) != d]).encode()).hexdigest()[:12]
    cache = Cache(key, enabled=not args.dry_run)
    rows_out, timings = [], {}
    print(f"reference log-probs: {sum(len(w.tokens) for w in windows)} windows of {args.seq_len} tokens", flush=True)
    ref_cache, ref_scores = refs.compute(src.model, windows, args.batch_size)
    rows = plan(args)
    with ref_cache, progress(total=len(rows), desc="recon rows", unit="row") as bar:
        for w, s in zip(windows, ref_scores):
            rows_out.append({"text": w.name, "model": model_name, "label": "fp32", "method": "none", "format": "fp32",
                             "bits": None, "bits_per_weight": 32.0, "kld": 0.0, "kld_p99": 0.0, "top1": 1.0,
                             "ppl": s.ppl, "bpb": s.bpb, "one_model": False, "targets": ""})
        for row in rows:
            got = cache.get(row)
            if got is None:
                t = time.perf_counter()
                model = quantize(row, src, calib, args, model_name, calib_specs)
                tq = time.perf_counter() - t
                got = {"rows": quality.evaluate(model, row, windows, ref_cache, args.batch_size), "quantize_s": tq,
                       "eval_s": time.perf_counter() - t - tq}
                del model
                cache.put(row, got)
            timings[row.label + ("" if row.one_model else f" b{row.bits[0]}")] = got["quantize_s"]
            for r in got["rows"]:
                rows_out.append({"model": model_name, "label": row.label, "method": row.method,
                                 "one_model": row.one_model, "targets": row.targets, **r})
            bar.update(1)
            bar.write(f"{row.label:26s} {row.fmt:18s} quantize {got['quantize_s']:7.1f}s  "
                      + "  ".join(f"b{r['bits']}:{r['kld']:.3f}" for r in got["rows"] if r["text"] == windows[0].name))
    return {
        "rows": rows_out,
        "windows": {w.name: {"count": len(w.tokens), "seq_len": args.seq_len, "text_tokens": w.total_tokens}
                    for w in windows},
        "calibration": {"texts": list(calib_specs), "samples": args.calib_samples, "seq_len": args.calib_len},
        "settings": {"iters": args.iters, "recon_batch": args.recon_batch, "qslaw_steps": args.qslaw_steps,
                     "qslaw_batch": args.qslaw_batch, "lsi_epochs": args.lsi_epochs, "lsi_k": args.lsi_k,
                     "targets": args.targets, "methods": list(args.methods)},
        "quantize_seconds": timings,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine,
        "model": model_name,
    }


# --------------------------------------------------------------------------- goals / report


def _family(row: dict) -> str:
    return "int-g128-asym" if row["format"].startswith("int") else row["format"]


def goals(result) -> list[tuple[bool | None, str]]:
    rows = [r for r in result["rows"] if r["bits"] is not None]
    out = []
    for family in dict.fromkeys(_family(r) for r in rows):
        sel = [r for r in rows if _family(r) == family]
        rtn = quality.mean_over_texts(sel, method="rtn", bits=GOAL_BITS)
        best = [(m["kld"], r) for r in RECON
                if (m := quality.mean_over_texts(sel, method=r, bits=GOAL_BITS)) is not None]
        if rtn is None or not best:
            out.append((None, f"{family}: b={GOAL_BITS} needs the rtn row and a reconstruction row"))
            continue
        kld, method = min(best)
        ratio = kld / rtn["kld"] if rtn["kld"] > 0 else float("inf")
        out.append((ratio <= GOAL_RATIO, f"{family} b={GOAL_BITS}: best reconstruction {LABELS[method]} KLD {kld:.3f} "
                                         f"≤ {GOAL_RATIO}× RTN's {rtn['kld']:.3f}: ratio {ratio:.2f}"))
    return out


# The seed papers' qualitative claims, as (method, baseline, text): checked at every b <= 3 each
# family measured, by mean KLD over the texts (lower wins).
CLAIMS = (
    ("la", "sb", "seed 001: looking ahead (LA-2) beats single-block reconstruction (SB)"),
    ("mb", "sb", "seed 001: reconstructing two blocks jointly (MB-2) beats SB"),
    ("lsi", "rtn", "seed 004: singular-value increments (LSI) beat plain RTN"),
    ("qslaw", "rtn", "seed 003: learned group scales (QSLAW) beat RTN"),
    ("sb", "gptq", "SignRound-style reconstruction (SB) beats GPTQ"),
)


def claims(result) -> list[tuple[bool | None, str]]:
    """Each claim per (family, b <= 3) with both rows measured: ✓ when the method's KLD is lower."""
    rows = [r for r in result["rows"] if r["bits"] is not None and r["bits"] <= GOAL_BITS]
    out = []
    for method, base, text in CLAIMS:
        for family in dict.fromkeys(_family(r) for r in rows):
            sel = [r for r in rows if _family(r) == family]
            for b in sorted({r["bits"] for r in sel}):
                m, ref = (quality.mean_over_texts(sel, method=x, bits=b) for x in (method, base))
                if m is None or ref is None:
                    continue
                out.append((m["kld"] < ref["kld"], f"{text} — {family} b={b}: {LABELS[method]} {m['kld']:.3f} vs "
                                                   f"{LABELS[base]} {ref['kld']:.3f}"
                                                   + (f" ({m['kld'] / ref['kld']:.2f}×)" if ref["kld"] > 0 else "")))
    return out


def markdown(result) -> str:
    rows = result["rows"]
    m = result["machine"]
    s = result["settings"]
    texts = list(result["windows"])
    by = {(r["text"], r["label"], r["bits"]): r for r in rows}
    out = [
        "## Block reconstruction: SB / LA-2 / MB-2 (SignRound) and LSI against RTN and GPTQ",
        "",
        f"Produced by `python benchmarks/recon_bench.py` on {result['model']} in {result['seconds'] / 60:.1f} min on "
        f"{m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads); python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}, otaro {m['otaro']}.",
        "Windows: " + ", ".join(f"{v['count']} × {v['seq_len']} tokens of {k}" for k, v in result["windows"].items())
        + f". Calibration: {result['calibration']['samples']} × {result['calibration']['seq_len']} tokens of "
        + ", ".join(result["calibration"]["texts"]) + f". SignRound: {s['iters']} steps per window (lr 1/steps, "
        f"batch {s.get('recon_batch', 8)}); LSI: {s['lsi_epochs']} epochs, k = {s['lsi_k']}; "
        f"QSLAW: {s.get('qslaw_steps', '–')} steps × {s.get('qslaw_batch', '–')} rows of the calibration text (task data "
        f"only: η = steps, the other text here is an evaluation text); {SEFP} targets `{s['targets']}` "
        "(noise-normalised λ). KLD: mean per-token KL(P_fp32 ‖ P_quant) in nats; top-1: argmax agreement.",
        "",
        "### Goals",
        "",
    ]
    for ok, text in goals(result):
        out.append(f"- {'✓' if ok else ('✗' if ok is False else '–')} {text}")
    out += ["", "### The seed papers' claims, checked here (mean KLD over the texts, b ≤ 3)", ""]
    out += [f"- {'✓' if ok else '✗'} {text}" for ok, text in claims(result)] or ["- (no pair measured)"]
    out.append("")
    labels = list(dict.fromkeys(r["label"] for r in rows if r["bits"] is not None))
    for t in texts:
        fp = by.get((t, "fp32", None))
        out += [f"### {t} (fp32 perplexity {fp['ppl']:.2f})" if fp else f"### {t}", "",
                "Cells: KLD / top-1 % / perplexity. int rows: one model per b; ssfp rows: one model, every b.", "",
                "| row | " + " | ".join(f"b={b}" for b in SEFP_BITS) + " |", "|---|" + "---|" * len(SEFP_BITS)]
        for label in labels:
            cells = [by.get((t, label, b)) for b in SEFP_BITS]
            out.append(f"| {label} | " + " | ".join(
                f"{c['kld']:.3f} / {100 * c['top1']:.0f} / {c['ppl']:.1f}" if c else "" for c in cells) + " |")
        out.append("")
    q = result["quantize_seconds"]
    out.append("Quantization time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in q.items()) + ".")
    out += ["", "![KLD vs bits](results/recon.png)"]
    return "\n".join(out)


def plot(result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from otaro.io import atomic_file

    rows = [r for r in result["rows"] if r["bits"] is not None]
    texts = list(result["windows"])
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 5), dpi=120, squeeze=False)
    for ax, t in zip(axes[0], texts):
        for i, label in enumerate(labels):
            pts = sorted((r for r in rows if r["text"] == t and r["label"] == label), key=lambda r: r["bits"])
            ax.plot([p["bits"] for p in pts], [max(p["kld"], 1e-5) for p in pts], "-o" if pts[0]["one_model"] else ":s",
                    ms=4, color=plt.cm.tab20(i % 20), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("bits")
        ax.set_ylabel("mean KL divergence to fp32 (nats/token, log)")
        ax.set_title(f"{result['model']} — {t}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200, help="SignRound steps per window for sb/la/mb (default 200)")
    ap.add_argument("--recon-batch", type=int, default=8, help="SignRound calibration windows per step (default 8)")
    ap.add_argument("--int-bits", default=",".join(map(str, INT_BITS)),
                    help="bit-widths of the per-bit int-g128-asym rows (default 2,3,4; the goal reads b=3)")
    ap.add_argument("--qslaw-steps", type=int, default=QSLAW_DEFAULTS["qslaw_steps"],
                    help=f"QSLAW optimizer steps (default {QSLAW_DEFAULTS['qslaw_steps']}; task data only)")
    ap.add_argument("--qslaw-batch", type=int, default=QSLAW_DEFAULTS["qslaw_batch"],
                    help=f"QSLAW rows per step (default {QSLAW_DEFAULTS['qslaw_batch']})")
    ap.add_argument("--lsi-epochs", type=int, default=2, help="LSI passes over the calibration windows (default 2)")
    ap.add_argument("--lsi-k", type=int, default=0, help="LSI k×k increment size (default 0)")
    ap.add_argument("--targets", default="2:1,3:1,4:1", help=f"{SEFP} target bit-widths with λ (default 2:1,3:1,4:1)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    ap.add_argument("--max-windows", type=int, default=3, help="evaluation windows per text (default 3)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="every row on a tiny random model and a paragraph of text, 2 steps; writes nothing")
    args = ap.parse_args()
    args.methods = tuple(m for m in args.methods.split(",") if m)
    try:
        args.int_bits = tuple(int(b) for b in args.int_bits.split(",") if b)
    except ValueError:
        ap.error(f"--int-bits: a comma list of integers, got {args.int_bits!r}")
    if any(not 2 <= b <= 8 for b in args.int_bits):
        ap.error(f"--int-bits: bit-widths between 2 and 8, got {args.int_bits}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.dry_run:  # seconds, not hours: the shapes of a run, none of its numbers
        args.iters, args.lsi_epochs, args.max_windows, args.seq_len = 2, 1, 2, 32
        args.calib_samples, args.calib_len, args.batch_size = 2, 32, 2
        args.qslaw_steps, args.qslaw_batch = 2, 2

    from otaro.errors import OtaroError
    from results_md import publish

    try:
        result = run(args)
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    if args.dry_run:
        for ok, text in goals(result):
            print(f"{'✓' if ok else ('✗' if ok is False else '–')} {text}")
        print(markdown(result))
        return 0
    result["args"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    body = publish("recon", result, plot, markdown)
    print(body)
    for ok, text in goals(result):
        print(f"{'✓' if ok else ('✗' if ok is False else '–')} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
