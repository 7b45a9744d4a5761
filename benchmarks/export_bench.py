"""`otaro export --format onnx` on SmolLM2-135M: time, bytes, validation, perplexity parity.

One run, side by side:
  * export the SEFP checkpoint (RTN by default, or the fine-tuned one from `make bench-finetune`)
    with two variants (fixed SEFP b=4, int4-g128-asym RTN): wall time and validation results;
  * bytes on disk of the single model vs the model-zoo alternative: one MatMulNBits file per
    bit-width 2..8, actually written (an export with variants sefp:2..8, not validated);
  * perplexity on Brown k–r and Austen of the torch model at b = 2..8 and of the ONNX model at
    the same b (onnxruntime exact mode = accuracy_level 1, and the shipped level 4), plus the
    variants against their torch models.

Writes benchmarks/results/export.json, benchmarks/results/export.png and the `export` section
of benchmarks/RESULTS.md. Usage: python benchmarks/export_bench.py [--max-windows N] [--checkpoint rtn|finetuned]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import publish  # noqa: E402

MODEL = "smollm2-135m"
SEFP_FMT = "sefp-g64-trunc"
INT_FMT = "int4-g128-asym"
TEXTS = ("corpus:brown-eval", "corpus:austen")
# Exact mode differs from torch only by fp32 summation order: per-token NLL moves by ~1e-6, so
# 1e-3 relative perplexity is a generous bound that a wrong bit-width (>= 1% at b = 8) breaks.
PPL_REL_TOL = 1e-3


def checkpoints(kind: str, cache: Path) -> tuple[Path, Path]:
    from otaro.quantize import QuantizeConfig, quantize

    ints = cache / f"{MODEL}-{INT_FMT}-rtn"
    if not (ints / "otaro.json").is_file():
        quantize(QuantizeConfig(MODEL, str(ints), format=INT_FMT, overwrite=True))
    if kind == "finetuned":
        sefp = cache.parent / "finetune" / MODEL / "otaro"
        if not (sefp / "otaro.json").is_file():
            raise SystemExit("no fine-tuned checkpoint: run `make bench-finetune` first, or use --checkpoint rtn")
        return sefp, ints
    sefp = cache / f"{MODEL}-{SEFP_FMT}-rtn"
    if not (sefp / "otaro.json").is_file():
        quantize(QuantizeConfig(MODEL, str(sefp), format=SEFP_FMT, overwrite=True))
    return sefp, ints


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("model.onnx"))


def onnx_nll(path: Path, windows, level: int, bits: int | None, threads: int) -> float:
    import numpy as np
    import onnxruntime as ort

    from otaro.export.validate import graph_variant, session_options
    from otaro.runtime.decoder import Decoder

    with graph_variant(path, bits=bits, accuracy_level=level) as g:
        dec = Decoder(ort.InferenceSession(str(g), session_options(level, threads), providers=["CPUExecutionProvider"]))
        nll = 0.0
        seq_len = windows.tokens.shape[1]
        # what otaro.evaluation.metrics.score reads: the BOS first when the tokenizer has one, and
        # the logits of the window's own positions predicting its tokens 1..seq_len-1
        for inputs, row in zip(windows.model_inputs().numpy(), windows.tokens.numpy()):
            logits = dec.prompt_logits(inputs.tolist())[-seq_len:-1].astype(np.float64)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((lse - logits[np.arange(seq_len - 1), row[1:]]).sum())
    return nll


def torch_nll(model, windows) -> float:
    from otaro.evaluation.metrics import score

    return score(model, windows).nll


def ppl(nll: float, windows) -> float:
    return math.exp(nll / (windows.tokens.shape[0] * (windows.tokens.shape[1] - 1)))


def measure(args) -> dict:
    import torch

    from otaro import checkpoint
    from otaro.assets import cache_dir
    from otaro.evaluation.data import make_windows, read_text
    from otaro.evaluation.run import machine_info
    from otaro.export.artifact import ExportConfig, export

    torch.set_num_threads(args.threads)
    cache = cache_dir() / "bench" / "export"
    cache.mkdir(parents=True, exist_ok=True)
    sefp_ck, int_ck = checkpoints(args.checkpoint, cache)
    art, zoo = cache / "artifact", cache / "zoo"
    print("exporting the artifact (with validation) ...", flush=True)
    t = time.perf_counter()
    man = export(ExportConfig(sefp_ck, art, variants=("sefp:4", f"int4-rtn={int_ck}"), overwrite=True,
                              threads=args.threads), progress=lambda s: print("  " + s, flush=True))
    export_s = time.perf_counter() - t
    print("exporting the per-bit zoo (no validation) ...", flush=True)
    t = time.perf_counter()
    export(ExportConfig(sefp_ck, zoo, variants=("sefp:2,3,4,5,6,7,8",), overwrite=True, validate=False))
    zoo_s = time.perf_counter() - t
    sizes = {"single": folder_bytes(art), "int4": folder_bytes(art / "variants/int4-rtn"),
             "per_bit": {b: folder_bytes(zoo / f"variants/sefp-b{b}") for b in range(2, 9)}}

    model = checkpoint.load(sefp_ck)
    int_model = checkpoint.load(int_ck)
    tok = checkpoint.load_tokenizer(sefp_ck)
    rows = []
    for text in TEXTS:
        label, body = read_text(text)
        w = make_windows(tok, body, args.seq_len, args.max_windows, label)
        print(f"perplexity on {label} ({w.tokens.shape[0]} x {args.seq_len} tokens) ...", flush=True)
        for b in range(2, 9):
            model.set_precision(b)
            row = {"dataset": label, "model": "main", "bits": b, "torch": ppl(torch_nll(model, w), w)}
            for level in (1, 4):
                row[f"onnx_l{level}"] = ppl(onnx_nll(art / "model.onnx", w, level, b, args.threads), w)
            rows.append(row)
            print(f"  b={b} torch {row['torch']:.3f} onnx exact {row['onnx_l1']:.3f} level-4 {row['onnx_l4']:.3f}", flush=True)
        model.set_precision(4)
        for name, tmodel, b in (("sefp-b4", model, 4), ("int4-rtn", int_model, 4)):
            row = {"dataset": label, "model": name, "bits": b, "torch": ppl(torch_nll(tmodel, w), w)}
            for level in (1, 4):
                row[f"onnx_l{level}"] = ppl(onnx_nll(art / f"variants/{name}/model.onnx", w, level, None, args.threads), w)
            rows.append(row)
    for r in rows:
        r["rel_diff_exact"] = abs(r["onnx_l1"] / r["torch"] - 1)
        r["rel_diff_l4"] = abs(r["onnx_l4"] / r["torch"] - 1)
        r["equal"] = r["rel_diff_exact"] <= PPL_REL_TOL
    info = machine_info()
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    return {"machine": info, "checkpoint": args.checkpoint, "export_seconds": export_s, "zoo_export_seconds": zoo_s,
            "validation": man["validation"], "sizes": sizes, "float_bytes": man["float_bytes"],
            "rows": rows, "seq_len": args.seq_len, "max_windows": args.max_windows, "ppl_rel_tol": PPL_REL_TOL}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fmt_ppl(x: float) -> str:
    return f"{x:.3e}" if x >= 1e4 else f"{x:.3f}"


def markdown(res: dict) -> str:
    m, s = res["machine"], res["sizes"]
    zoo = sum(s["per_bit"].values())
    val = res["validation"]["results"]
    n_ok = sum(r["passed"] for r in val)
    eq = sum(r["equal"] for r in res["rows"])
    out = [
        "## ONNX export of SmolLM2-135M (`benchmarks/export_bench.py`)",
        "",
        f"Command: `python benchmarks/export_bench.py --checkpoint {res['checkpoint']} --max-windows {res['max_windows']}`. "
        f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, transformers {m['transformers']}, "
        f"onnxruntime {m['onnxruntime']}. Checkpoint: {SEFP_FMT} "
        f"({'RTN' if res['checkpoint'] == 'rtn' else 'OTARo fine-tuned'}); variants: fixed SEFP b=4 and {INT_FMT} RTN.",
        "",
        f"- **Export time**: {res['export_seconds']:.0f} s for the artifact (trace ×2, rewrite, 2 variants, "
        f"validation of 7 bit-widths + 2 variants); {res['zoo_export_seconds']:.0f} s for a 7-file zoo without validation.",
        f"- **Validation**: {n_ok}/{len(val)} checks passed (exact mode, {val[0]['torch_tokens'].__len__()} greedy tokens "
        f"equal, max |Δlogit| {max(r['max_abs_diff'] for r in val):.1e}; at the shipped accuracy_level 4: max |Δlogit| "
        f"{max(r['shipped_max_abs_diff'] for r in val):.2f}, greedy equal in "
        f"{sum(r['shipped_greedy_equal'] for r in val)}/{len(val)}).",
        f"- **Bytes on disk**: the single model {mib(s['single'])} serves b = 2…8; seven per-bit MatMulNBits files take "
        f"{mib(zoo)} ({zoo / s['single']:.1f}×). The fp32 float part (tied embedding/head, norms) is "
        f"{mib(res['float_bytes'])} of every file.",
        f"- **Perplexity parity**: {eq}/{len(res['rows'])} rows have ONNX (exact) perplexity within "
        f"{res['ppl_rel_tol']:g} relative of torch.",
        "",
        "| file | bytes |", "|---|---|",
        f"| single SEFP model (all b) | {mib(s['single'])} |",
        *[f"| per-bit file b={b} | {mib(v)} |" for b, v in s["per_bit"].items()],
        f"| sum of per-bit files | {mib(zoo)} |",
        f"| {INT_FMT} variant | {mib(s['int4'])} |",
        "",
        f"Perplexity ({res['max_windows']} × {res['seq_len']}-token windows per text):",
        "",
        "| text | model | b | torch | ONNX exact | rel. diff | ONNX level 4 | rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(f"| {r['dataset']} | {r['model']} | {r['bits']} | {fmt_ppl(r['torch'])} | {fmt_ppl(r['onnx_l1'])} | "
                   f"{r['rel_diff_exact']:.1e} | {fmt_ppl(r['onnx_l4'])} | {r['rel_diff_l4']:.1e} |")
    out += ["", "![export](results/export.png)", "",
            "Level 4 quantizes activations to int8 inside MatMulNBits (onnxruntime's fast CPU path); the "
            "rel. diff column shows what that costs in perplexity. Exact mode (level 1) is what validation uses."]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in res["rows"]))
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5 * (len(datasets) + 1), 4))
    for ax, d in zip(axes, datasets):
        rows = [r for r in res["rows"] if r["dataset"] == d and r["model"] == "main"]
        b = [r["bits"] for r in rows]
        for key, style, label in (("torch", "-o", "torch"), ("onnx_l1", "--x", "ONNX exact"), ("onnx_l4", ":s", "ONNX level 4")):
            ax.plot(b, [r[key] for r in rows], style, label=label)
        ax.set_yscale("log")
        ax.set(title=f"SmolLM2-135M {d}", xlabel="bits", ylabel="perplexity")
        ax.legend()
    s = res["sizes"]
    ax = axes[-1]
    names = ["single SEFP"] + [f"b={b}" for b in s["per_bit"]]
    vals = [s["single"]] + list(s["per_bit"].values())
    ax.bar(names[:1], [v / 2**20 for v in vals[:1]], color="C0", label="one model, all b")
    bottom = 0.0
    for n, v in zip(names[1:], vals[1:]):
        ax.bar(["per-bit zoo"], [v / 2**20], bottom=bottom, label=n)
        bottom += v / 2**20
    ax.set(title="bytes on disk", ylabel="MiB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", choices=("rtn", "finetuned"), default="rtn")
    ap.add_argument("--max-windows", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    print(publish("export", measure(args), plot, markdown))


if __name__ == "__main__":
    main()
