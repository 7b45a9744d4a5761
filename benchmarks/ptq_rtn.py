"""Post-training round-to-nearest baselines on SmolLM2-135M, side by side in one run.

Rows: fp32; SEFP (group 64) with the three decodes `trunc`, `nearest`, `midpoint` at b = 2..8,
all derived from one stored 8-bit code per decode; integer RTN, symmetric and asymmetric, groups
64 and 128, one model per b. Texts: Brown genres k–r and Jane Austen's novels (the evaluation
splits; Brown a–j is kept for calibration and training). Perplexity over evenly spaced
512-token windows, tokenized without special tokens.

Writes benchmarks/results/ptq_rtn.json, benchmarks/results/ptq_rtn.png and the `ptq_rtn`
section of benchmarks/RESULTS.md. Usage: python benchmarks/ptq_rtn.py [--max-windows N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import update_section  # noqa: E402

SEFP = ["sefp-g64-trunc", "sefp-g64-nearest", "sefp-g64-midpoint"]
INT_SERIES = [("sym", 64), ("asym", 64), ("sym", 128), ("asym", 128)]
TEXTS = ["corpus:brown-eval", "corpus:austen"]


def int_formats() -> list[str]:
    return [f"int{b}-g{g}-{kind}" for kind, g in INT_SERIES for b in range(2, 9)]


def plot(rows, path: Path) -> None:
    from plots import ppl_panels

    ppl_panels(rows, path, series="label", x="bits_per_weight",
               xlabel="bits per weight (exponent / scale / zero point included)",
               title=lambda d: f"SmolLM2-135M RTN — {d}", style=lambda name: "-o" if name.startswith("sefp") else ":s")


def fmt_ppl(ppl: float) -> str:
    return f"{ppl:.2e}" if ppl >= 1e4 else f"{ppl:.2f}"


def markdown(result) -> str:
    rows = result["rows"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    labels = [l for l in dict.fromkeys(r["label"] for r in rows) if l != "fp32"]
    by = {(r["dataset"], r["label"], r["bits"]): r for r in rows}
    m = result["machine"]
    w = result["windows"]
    out = [
        "## Post-training RTN on SmolLM2-135M: SEFP decodes vs integer RTN",
        "",
        f"Produced by `python benchmarks/ptq_rtn.py` in {result['seconds'] / 60:.1f} min on {m['processor']}, "
        f"{m['cpus']} CPUs ({m['torch_threads']} torch threads); python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, otaro {m['otaro']}.",
        "Perplexity over " + ", ".join(f"{v['count']} × {v['seq_len']}-token windows of {k} ({v['text_tokens']:,} tokens)" for k, v in w.items())
        + " (evenly spaced, no special tokens). Linear layers of the 30 decoder blocks are quantized; "
        "embeddings / tied head stay fp32. bits/weight counts the 8-bit shared exponent per 64 weights (SEFP) "
        "or the fp16 scale (+ b-bit zero point) per group (int).",
        "",
        "**Caveat (docs/FACTS.md):** the only SmolLM2 weights available offline are the Q4_1 GGUF, whose linear "
        "weights sit exactly on a 4-bit asymmetric group-32 grid. An int4 asymmetric g32 re-quantization would "
        "be lossless on it, so group 32 is left out of the integer baselines; the other schemes show real error, "
        "but absolute numbers still differ from the original bf16 model.",
        "",
    ]
    for d in datasets:
        fp = by.get((d, "fp32", None))
        out.append(f"### {d} (fp32 perplexity {fp['ppl']:.2f})" if fp else f"### {d}")
        out.append("")
        out.append("| b | " + " | ".join(labels) + " |")
        out.append("|---|" + "---|" * len(labels))
        for b in range(2, 9):
            cells = []
            for l in labels:
                r = by.get((d, l, b))
                cells.append(f"{fmt_ppl(r['ppl'])} ({r['bits_per_weight']:.3g})" if r else "")
            out.append(f"| {b} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Cells: perplexity (bits per weight). One SEFP column is one stored model; each integer cell is its own model.")
    out.append("")
    out.append("![perplexity vs bits per weight](results/ptq_rtn.png)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-windows", type=int, default=16, help="512-token windows per text (default 16)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (throughput only)")
    args = ap.parse_args()

    from otaro.errors import OtaroError
    from otaro.evaluation.run import EvalConfig, run_eval
    from otaro.io import write_json

    cfg = EvalConfig(
        model="smollm2-135m", texts=tuple(TEXTS), formats=tuple(SEFP + int_formats()), seq_len=args.seq_len,
        max_windows=args.max_windows, threads=args.threads, batch_size=args.batch_size,
    )
    try:
        result = run_eval(cfg)
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    (HERE / "results").mkdir(exist_ok=True)
    write_json(HERE / "results" / "ptq_rtn.json", result)
    plot(result["rows"], HERE / "results" / "ptq_rtn.png")
    body = markdown(result)
    update_section("ptq_rtn", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
