"""Fidelity of the one SEFP model against per-bit integer models, on SmolLM2-135M.

Judged as llama.cpp's ``--kl-divergence`` does: per-token KL divergence from the fp32 model
(mean and p99) and top-1 agreement with it, beside perplexity, over the same token windows;
the reference log-probs are computed once per text and reused by every row.

One-model rows (one stored 8-bit code, every b derived): each SEFP/ssfp row via RTN, multi-bit
RTN (``mbrtn``) and multi-bit GPTQ (``gptq --bits``), plus any checkpoint given with
``--checkpoint NAME=PATH`` (e.g. a fine-tuned one). Per-bit rows (one model per b): integer RTN
(groups 64/128, sym/asym) and our integer GPTQ (g128). Calibration for GPTQ comes from Brown
genres a-j (``brown-train``); the evaluation texts are Brown k-r and Jane Austen.

Writes benchmarks/results/quality.json (one row per text, model, method, format, bits),
benchmarks/results/quality.png (KLD against bits per weight) and the ``quality`` section of
benchmarks/RESULTS.md, and prints a check mark per goal. Every (row, b) result is cached under
~/.cache/otaro/bench/quality so an interrupted run resumes where it stopped.

Usage: python benchmarks/quality.py [--max-windows N] [--calib-samples N] [--only-goal-rows]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL = "smollm2-135m"
TEXTS = ("corpus:brown-eval", "corpus:austen")
CALIB = ("corpus:brown-train",)
BITS = (2, 3, 4, 5, 6, 8)
# λ for the multi-bit rows (noise-normalised weights, see otaro.methods.sefp_quantizer): the
# precisions the product switches across (3-4 bits to read, 8 to write), two trade-offs.
TARGETS = {"even": "3:1,4:1,8:1", "low": "3:16,4:4,8:1", "mid": "3:16,4:4,8:4"}
# "mid" was added after the first run showed "low" just short of 97% top-1 at b = 8; it runs on
# the g32 rows only (G32 below), and "even" on no GPTQ row (mbrtn uses it): each multi-bit GPTQ
# run costs 10-20 min here, so one GPTQ row per shared-scale kind ("low") is measured at g64.
TARGETS_ONLY = {"mid": (), "even": ()}
# llama.cpp's Q4_0/Q8_0 layout (groups of 32, one fp16 scale: b + 0.5 bits per weight), as one
# model; its per-bit peer is int-g32-sym (int asym g32 is lossless on these weights: left out).
G32 = ("ssfp-g32-nearest",)
# Block reconstruction as a one-model row (MB-2, SignRound on the stored code, issue 11) with b = 8
# among its targets: without it the learned clipping drifts b = 8 to KLD ~0.05 (RESULTS "recon").
# Sized as recon_bench's CPU run (16 × 256 calibration tokens, 50 steps of 4 windows per block
# pair); the options are QuantizeConfig fields and part of the row's cache key.
RECON_OPTIONS = (("calib_len", 256), ("calib_samples", 16), ("recon_batch", 4), ("recon_blocks", 2),
                 ("recon_iters", 50))
RECON = ("ssfp-g64-nearest",)


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    fmt: str
    one_model: bool
    bits: tuple[int, ...]
    targets: str = ""  # --bits of a multi-bit method
    # (QuantizeConfig field, value) pairs of the method, calibration size included; out of repr (the
    # cache key of rows measured before options existed) and added to the key by row_key when set
    options: tuple = field(default=(), repr=False)
    checkpoint: str = ""  # an existing checkpoint instead of a method run
    # label of the PTQ row a checkpoint row (fine-tuned) started from; not in repr, which is
    # the cache key, since it does not change the measured numbers
    start: str = field(default="", repr=False)


def plan(args) -> list[Row]:
    rows: list[Row] = []
    sefp = ["sefp-g64-nearest", "ssfp-g64-nearest"]
    for fmt in ("sefp-g64-trunc", "sefp-g64-midpoint", "ssfp-g64-trunc", "ssfp-g64-midpoint", *sefp):
        rows.append(Row(f"{fmt} rtn", "rtn", fmt, True, BITS))
    for fmt in sefp:
        rows.append(Row(f"{fmt} mbrtn", "mbrtn", fmt, True, BITS, targets=TARGETS["even"]))
        for key, spec in TARGETS.items():
            if fmt in TARGETS_ONLY.get(key, (fmt,)):
                rows.append(Row(f"{fmt} gptq[{key}]", "gptq", fmt, True, BITS, targets=spec))
    for spec in args.checkpoint:
        name, _, rest = spec.partition("=")
        path, _, start = rest.partition(":")
        rows.append(Row(name, "checkpoint", "", True, BITS, checkpoint=path, start=start))
    for fmt in G32:
        rows.append(Row(f"{fmt} rtn", "rtn", fmt, True, BITS))
        for key in ("low", "mid"):
            rows.append(Row(f"{fmt} gptq[{key}]", "gptq", fmt, True, BITS, targets=TARGETS[key]))
    for fmt in RECON:
        rows.append(Row(f"{fmt} mb-2[even]", "mb", fmt, True, BITS, targets=TARGETS["even"], options=RECON_OPTIONS))
    for kind, g in (("sym", 32), ("sym", 64), ("asym", 64), ("sym", 128), ("asym", 128)):
        for b in BITS:
            rows.append(Row(f"int-g{g}-{kind} rtn", "rtn", f"int{b}-g{g}-{kind}", False, (b,)))
    for b in (2, 3, 4):
        rows.append(Row("int-g128-asym gptq", "gptq", f"int{b}-g128-asym", False, (b,)))
    if args.only_goal_rows:
        # the rows the goals compare: the best one-model candidates, every per-bit int RTN row (the
        # "no worse than every int RTN model" goal) and per-bit GPTQ
        keep = {"ssfp-g64-nearest rtn", "sefp-g64-nearest rtn", "ssfp-g64-nearest gptq[low]", "int-g128-asym gptq",
                *(f"{fmt} rtn" for fmt in G32), *(f"{fmt} gptq[{k}]" for fmt in G32 for k in ("low", "mid"))}
        rows = [r for r in rows if r.label in keep or r.method == "checkpoint" or r.options
                or (not r.one_model and r.method == "rtn")]
    return rows


# --------------------------------------------------------------------------- running


def same_settings(published: dict, args, reference_ppl: dict[str, float]) -> bool:
    """Whether a published result was measured with this run's windows, calibration and λ
    targets *and* against the same reference: its fp32 perplexity per text must equal this run's
    (to 1e-6 relative), since a changed model conversion, text reader or window choice changes
    every KLD without changing any setting."""
    a = published.get("args") or {}
    if not (all(a.get(k) == getattr(args, k) for k in ("max_windows", "seq_len", "calib_samples", "calib_len"))
            and published.get("targets") == TARGETS):
        return False
    theirs = {r["text"]: r["ppl"] for r in published.get("rows", []) if r.get("label") == "fp32"}
    return set(theirs) == set(reference_ppl) and all(
        abs(theirs[t] - reference_ppl[t]) <= 1e-6 * reference_ppl[t] for t in reference_ppl)


def row_key(row: Row) -> str:
    """The cache key of a row's measurement."""
    return repr(row) + (f" options={row.options!r}" if row.options else "")


class Cache:
    """(row, bits, text) -> metrics, persisted after every row so a rerun resumes."""

    def __init__(self, key: str):
        self.path = Path.home() / ".cache" / "otaro" / "bench" / "quality" / f"{key}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def seed(self, published: dict, rows: list[Row], args, reference_ppl: dict[str, float]) -> int:
        """Fill the rows missing here from the published results/quality.json when it was measured
        with the same settings (windows, calibration, λ targets), so a new machine measures only
        the rows that are new; returns how many rows were taken. Checkpoint rows are never taken
        (their checkpoint is a local folder)."""
        if not same_settings(published, args, reference_ppl):
            return 0
        taken = 0
        for row in rows:
            if row.method == "checkpoint" or self.get(row) is not None:
                continue
            got = [{k: v for k, v in r.items() if k not in ("model", "label", "method", "one_model", "targets", "start")}
                   for r in published["rows"] if r.get("label") == row.label and r.get("method") == row.method
                   and (row.one_model or r.get("bits") == row.bits[0])]
            if len(got) != len(TEXTS) * len(row.bits):
                continue
            key = row.label + ("" if row.one_model else f" b{row.bits[0]}")
            self.data[row_key(row)] = {"rows": got, "quantize_s": published.get("quantize_seconds", {}).get(key, 0.0),
                                    "eval_s": 0.0, "seeded": True}
            taken += 1
        return taken

    def get(self, row: Row):
        return self.data.get(row_key(row))

    def put(self, row: Row, value) -> None:
        from otaro.io import write_json

        self.data[row_key(row)] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)


def quantize(row: Row, src, calib, args):
    """``calib``: the calibration windows of this run's size, or a function of (samples, seq_len)
    that reads them for a row whose options size its own."""
    import torch

    from otaro import checkpoint
    from otaro.formats import get_format
    from otaro.methods import get_method
    from otaro.quantize import QuantizeConfig

    if row.checkpoint:
        return checkpoint.load(row.checkpoint)
    fmt = get_format(row.fmt)
    method = get_method(row.method)
    opts = {"calib_samples": args.calib_samples, "calib_len": args.calib_len, **dict(row.options)}
    # the config validates an output folder that must not exist; nothing is written there
    cfg = QuantizeConfig(model=MODEL, output=str(Path(tempfile.gettempdir()) / "otaro-quality-unused"),
                         method=row.method, format=row.fmt,
                         calib=CALIB if method.needs_calibration else (), bits=row.targets or (), **opts)
    data = None
    if method.needs_calibration:
        data = calib(opts["calib_samples"], opts["calib_len"]) if callable(calib) else calib
    with torch.no_grad():  # the reconstruction methods turn gradients on for their own steps
        return method.run(copy.deepcopy(src.model), fmt, cfg, data, None)


def evaluate(model, row: Row, windows, cache_ref, batch_size: int) -> list[dict]:
    from otaro.evaluation.metrics import score
    from otaro.modules import set_precision

    fmt = model.otaro.fmt
    out = []
    for b in row.bits:
        if fmt.family == "sefp":
            set_precision(model, b)
        for i, w in enumerate(windows):
            s = score(model, w, batch_size, reference=cache_ref[i])
            out.append({"text": w.name, "bits": b, "bits_per_weight": fmt.bits_per_weight(b), "format": fmt.name,
                        "kld": s.kld, "kld_p99": s.kld_p99, "top1": s.top1, "ppl": s.ppl, "bpb": s.bpb})
    return out


def run(args) -> dict:
    import torch

    from otaro.evaluation import reference as refs
    from otaro.evaluation.data import make_windows, read_text
    from otaro.evaluation.run import machine_info
    from otaro.methods.calib import calibration_windows
    from otaro.sources import load_source

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    src = load_source(MODEL)
    max_pos = getattr(src.model.config, "max_position_embeddings", None)
    windows = [make_windows(src.tokenizer, text, args.seq_len, args.max_windows, label, max_pos)
               for label, text in (read_text(t) for t in TEXTS)]
    calib_sets: dict = {}

    def calib(samples: int, seq_len: int):
        if (samples, seq_len) not in calib_sets:
            calib_sets[(samples, seq_len)] = calibration_windows(src.tokenizer, list(CALIB), samples, seq_len, seed=0,
                                                                 max_positions=max_pos)
        return calib_sets[(samples, seq_len)]
    key = hashlib.sha256(json.dumps([MODEL, args.seq_len, args.max_windows, args.calib_samples, args.calib_len,
                                     BITS]).encode()).hexdigest()[:12]
    cache = Cache(key)
    published = HERE / "results" / "quality.json"
    rows_out: list[dict] = []
    timings: dict[str, float] = {}
    print(f"reference log-probs: {sum(len(w.tokens) for w in windows)} windows of {args.seq_len} tokens", flush=True)
    ref_cache, ref_scores = refs.compute(src.model, windows, args.batch_size)
    reference_ppl = {w.name: sc.ppl for w, sc in zip(windows, ref_scores)}
    if published.is_file():
        taken = cache.seed(json.loads(published.read_text()), plan(args), args, reference_ppl)
        if taken:
            print(f"{taken} rows taken from the published {published.name} (same settings and reference; delete "
                  f"{cache.path} and that file to re-measure them)", flush=True)
    with ref_cache:
        for w, s in zip(windows, ref_scores):
            rows_out.append({"text": w.name, "model": MODEL, "label": "fp32", "method": "none", "format": "fp32",
                             "bits": None, "bits_per_weight": 32.0, "kld": 0.0, "kld_p99": 0.0, "top1": 1.0,
                             "ppl": s.ppl, "bpb": s.bpb, "one_model": False, "targets": ""})
        for row in plan(args):
            got = cache.get(row)
            if got is None:
                t = time.perf_counter()
                model = quantize(row, src, calib, args)
                tq = time.perf_counter() - t
                got = {"rows": evaluate(model, row, windows, ref_cache, args.batch_size), "quantize_s": tq,
                       "eval_s": time.perf_counter() - t - tq}
                del model
                cache.put(row, got)
            timings[row.label + ("" if row.one_model else f" b{row.bits[0]}")] = got["quantize_s"]
            for r in got["rows"]:
                rows_out.append({"model": MODEL, "label": row.label, "method": row.method, "one_model": row.one_model,
                                 "targets": row.targets, "start": row.start, **r})
            print(f"{row.label:28s} {row.fmt or row.checkpoint:20s} quantize {got['quantize_s']:6.1f}s  "
                  + "  ".join(f"b{r['bits']}:{r['kld']:.3f}" for r in got["rows"] if r["text"] == windows[0].name),
                  flush=True)
    carried = []
    if not args.checkpoint and published.is_file():
        # no checkpoint given: keep the published fine-tuned rows (same settings), marked as carried
        # over, so re-measuring the PTQ rows does not drop the fine-tuning goal
        old = json.loads(published.read_text())
        if same_settings(old, args, reference_ppl):
            for r in old["rows"]:
                if r.get("method") == "checkpoint":
                    rows_out.append({**r, "carried": True})
                    carried.append(r["label"])
    return {
        "carried": sorted(set(carried)),
        "rows": rows_out,
        "windows": {w.name: {"count": len(w.tokens), "seq_len": args.seq_len, "text_tokens": w.total_tokens}
                    for w in windows},
        "calibration": {"texts": list(CALIB), "samples": args.calib_samples, "seq_len": args.calib_len},
        "targets": TARGETS,
        "quantize_seconds": timings,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
    }


# --------------------------------------------------------------------------- goals / report


def mean_over_texts(rows, **match):
    sel = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if not sel:
        return None
    return {k: sum(r[k] for r in sel) / len(sel) for k in ("kld", "top1", "ppl", "bits_per_weight")}


def b8_ok(m) -> bool:
    """The b = 8 goal: KLD <= 0.005 and top-1 agreement >= 97% (near-lossless generation)."""
    return m["kld"] <= 0.005 and m["top1"] >= 0.97


def goals(result) -> list[tuple[bool | None, str]]:
    rows = [r for r in result["rows"] if r["bits"] is not None]
    labels_one = list(dict.fromkeys(r["label"] for r in rows if r["one_model"]))
    out = []
    # "The one model": the single row with the lowest KLD summed over b = 3 and 4 (the
    # precisions the product reads at) among the rows that keep b = 8 (the precision it
    # generates at) within its bar; a model that is good at 3-4 bits but not at 8 is not one
    # model a user can ship for both. Only when no row keeps b = 8 is the choice among all.
    # Every goal is checked on that same model.
    scored = [(sum(mean_over_texts(rows, label=l, bits=b)["kld"] for b in (3, 4)), l) for l in labels_one
              if all(mean_over_texts(rows, label=l, bits=b) for b in (3, 4, 8))]
    if not scored:
        return [(None, "no one-model row has b = 3, 4 and 8")]
    keeps_8 = [(s, l) for s, l in scored if b8_ok(mean_over_texts(rows, label=l, bits=8))]
    chosen = min(keeps_8 or scored)[1]
    best = {b: (mean_over_texts(rows, label=chosen, bits=b), chosen) for b in (3, 4, 8)}
    out.append((None, f"the one model judged below: {chosen} (lowest KLD at b = 3 + 4"
                      + (" among the rows that meet the b = 8 bar)" if keeps_8 else "; no row meets the b = 8 bar)")))
    for b in (4, 3):
        if b not in best:
            continue
        m, label = best[b]
        ints = {r["label"] for r in rows if not r["one_model"] and r["method"] == "rtn" and r["bits"] == b}
        worse = []
        for l in sorted(ints):
            im = mean_over_texts(rows, label=l, bits=b)
            if im and im["bits_per_weight"] >= m["bits_per_weight"] - 1e-9 and im["kld"] < m["kld"]:
                worse.append(f"{l} {im['kld']:.3f}")
        out.append((not worse, f"b={b}: best one model ({label}, KLD {m['kld']:.3f} at {m['bits_per_weight']:.3g} bpw) "
                               f"no worse than every int RTN model with >= its bits/weight" + (f" — beaten by {', '.join(worse)}" if worse else "")))
        g = mean_over_texts(rows, label="int-g128-asym gptq", bits=b)
        if g:
            ok = m["kld"] <= 1.25 * g["kld"]
            out.append((ok, f"b={b}: within 1.25x of per-bit GPTQ (int{b}-g128-asym, KLD {g['kld']:.3f} at {g['bits_per_weight']:.3g} bpw): ratio {m['kld'] / g['kld']:.2f}"))
    if 8 in best:
        m, label = best[8]
        out.append((b8_ok(m),
                    f"b=8: best one model ({label}) KLD {m['kld']:.4f} <= 0.005 and top-1 {100 * m['top1']:.1f}% >= 97%"))
    ft = list(dict.fromkeys(r["label"] for r in rows if r["method"] == "checkpoint"))
    if not ft:
        out.append((None, "fine-tuned one model beats its PTQ start at every b <= 4: no fine-tuned checkpoint given "
                          "(--checkpoint NAME=PATH:START_LABEL)"))
    for label in ft:
        start = next((r["start"] for r in rows if r["label"] == label and r.get("start")), None)
        if not start:
            continue
        pairs = [(b, mean_over_texts(rows, label=label, bits=b), mean_over_texts(rows, label=start, bits=b))
                 for b in (2, 3, 4)]
        ok = all(f and p and f["kld"] < p["kld"] for _, f, p in pairs)
        out.append((ok, f"fine-tuned {label} beats its PTQ start ({start}) at every b <= 4: " + ", ".join(
            f"b={b} {f['kld']:.3f} vs {p['kld']:.3f}" for b, f, p in pairs if f and p)))
    return out


def markdown(result) -> str:
    rows = result["rows"]
    m = result["machine"]
    texts = list(result["windows"])
    one = list(dict.fromkeys(r["label"] for r in rows if r["one_model"]))
    per = list(dict.fromkeys(r["label"] for r in rows if not r["one_model"] and r["bits"] is not None))
    by = {(r["text"], r["label"], r["bits"]): r for r in rows}
    out = [
        "## Quality: the one SEFP model against per-bit integer models (KL divergence to fp32)",
        "",
        f"Produced by `python benchmarks/quality.py` in {result['seconds'] / 60:.1f} min on {m['processor']}, "
        f"{m['cpus']} CPUs ({m['torch_threads']} torch threads); python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, otaro {m['otaro']}.",
        "Windows: " + ", ".join(f"{v['count']} × {v['seq_len']} tokens of {k}" for k, v in result["windows"].items())
        + f". GPTQ calibration: {result['calibration']['samples']} × {result['calibration']['seq_len']} tokens of "
        + ", ".join(result["calibration"]["texts"]) + ". Multi-bit targets (λ, noise-normalised): "
        + "; ".join(f"`{k}` = {v}" for k, v in result["targets"].items()) + ".",
        "KLD: mean per-token KL(P_fp32 ‖ P_quant) in nats; top-1: agreement of the argmax with fp32. Linear layers of "
        "the 30 blocks are quantized; embeddings and the tied head stay fp32.",
        "",
        "**Caveat (docs/FACTS.md):** the SmolLM2 weights available offline are the Q4_1 GGUF, whose linear weights sit "
        "exactly on a 4-bit asymmetric group-32 grid; int4 asym g32 would be lossless on them and is left out.",
        "",
        "### Goals",
        "",
    ]
    for ok, text in goals(result):
        out.append(f"- {'✓' if ok else ('✗' if ok is False else '–')} {text}")
    out.append("")
    if result.get("carried"):
        out += [f"Rows carried over from the previous published run (their checkpoints were not given to this one; "
                f"measured with the same windows and settings): {', '.join(result['carried'])}.", ""]
    for t in texts:
        fp = by.get((t, "fp32", None))
        out += [f"### {t} (fp32 perplexity {fp['ppl']:.2f})" if fp else f"### {t}", "",
                "One model per column (every b from one stored code). Cells: KLD / top-1 % / perplexity.", "",
                "| row | " + " | ".join(f"b={b}" for b in BITS) + " |", "|---|" + "---|" * len(BITS)]
        for l in one:
            cells = [by.get((t, l, b)) for b in BITS]
            out.append(f"| {l} | " + " | ".join(f"{c['kld']:.3f} / {100 * c['top1']:.0f} / {c['ppl']:.1f}" if c else ""
                                               for c in cells) + " |")
        out += ["", "Per-bit models (one model per cell):", "",
                "| row | " + " | ".join(f"b={b}" for b in BITS) + " |", "|---|" + "---|" * len(BITS)]
        for l in per:
            cells = [by.get((t, l, b)) for b in BITS]
            out.append(f"| {l} | " + " | ".join(
                f"{c['kld']:.3f} / {100 * c['top1']:.0f} / {c['ppl']:.1f} ({c['bits_per_weight']:.3g})" if c else ""
                for c in cells) + " |")
        out.append("")
    q = result["quantize_seconds"]
    out.append("Quantization time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in q.items() if v >= 1) + ".")
    out += ["", "![KLD vs bits per weight](results/quality.png)"]
    return "\n".join(out)


def plot(result, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from otaro.io import atomic_file

    rows = [r for r in result["rows"] if r["bits"] is not None]
    texts = list(result["windows"])
    labels = list(dict.fromkeys(r["label"] for r in rows))
    one_labels = [l for l in labels if any(r["one_model"] for r in rows if r["label"] == l)]
    per_labels = [l for l in labels if l not in one_labels]
    # one colour per series: tab20 for the one-model rows, greys for the per-bit baselines
    colours = {l: plt.cm.tab20(i % 20) for i, l in enumerate(one_labels)}
    colours.update({l: plt.cm.Greys(0.35 + 0.6 * i / max(1, len(per_labels) - 1)) for i, l in enumerate(per_labels)})
    fig, axes = plt.subplots(1, len(texts), figsize=(7.5 * len(texts), 5.5), dpi=120, squeeze=False)
    for ax, t in zip(axes[0], texts):
        for label in labels:
            pts = sorted((r for r in rows if r["text"] == t and r["label"] == label), key=lambda r: r["bits"])
            one = pts[0]["one_model"]
            ax.plot([p["bits_per_weight"] for p in pts], [max(p["kld"], 1e-5) for p in pts],
                    "-o" if one else ":s", ms=4, lw=1.6 if one else 1.2, color=colours[label],
                    label=label + ("" if one else " (per-bit)"))
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (shared scale / zero point included)")
        ax.set_ylabel("mean KL divergence to fp32 (nats/token, log)")
        ax.set_title(f"SmolLM2-135M — {t}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-windows", type=int, default=3, help="512-token windows per text (default 3)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows (default 32)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH[:START]",
                    help="add a one-model row from an existing SEFP checkpoint (e.g. fine-tuned); START is the "
                         "label of the PTQ row it started from, for the fine-tuning goal")
    ap.add_argument("--only-goal-rows", action="store_true", help="only the rows the goals compare (faster)")
    ap.add_argument("--replot", action="store_true",
                    help="re-render the table, goals and plot from benchmarks/results/quality.json (no measuring)")
    args = ap.parse_args()

    from otaro.errors import OtaroError
    from results_md import publish

    if args.replot:
        result = json.loads((HERE / "results" / "quality.json").read_text())
        print(publish("quality", result, plot, markdown))
        return 0
    try:
        result = run(args)
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    # checkpoint rows are recorded by name and folder name only: no machine paths in the results
    result["args"] = {**vars(args), "checkpoint": [
        f"{c.partition('=')[0]}={Path(c.partition('=')[2].partition(':')[0]).name}" for c in args.checkpoint]}
    body = publish("quality", result, plot, markdown)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
