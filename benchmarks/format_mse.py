"""Weight error of the number formats on SmolLM2-135M's linears, and of one candidate format.

A cheap screen before building a format into the whole product (codec, modules, GPTQ, ONNX,
runtime): the relative squared error ‖Q(W) − W‖² / ‖W‖² over every quantized linear, per
bit-width and group size, round-to-nearest (no calibration). It ranks formats the way the
KL-divergence benchmark (benchmarks/quality.py) does at RTN, in seconds instead of half an hour;
it is not a substitute for KLD (it weighs every weight alike, where the model does not).

Rows:
* ``ssfp-gG-nearest``: the shipped one-model row (otaro.formats, the real codec);
* ``intB-gG-asym`` / ``intB-gG-sym``: per-bit integer RTN (otaro.formats, the real codec);
* ``u8-gG-mid`` (a *candidate*, prototyped here only): one unsigned 8-bit code per weight on
  [min, max] of its group (an fp16 scale and an fp16 minimum per group), every lower b derived by
  truncating the code (dropping its low 8 − b bits: a bit-plane prefix) and decoded at the middle
  of the truncated cell. Its b-bit levels are 2^b equal cells over the group's range with the
  level at each cell's centre, where an asymmetric int grid puts its end levels on the range's
  ends and so spends half a cell outside it on each side.

Caveat (docs/FACTS.md): SmolLM2's offline weights sit on a 4-bit asymmetric group-32 grid (Q4_1),
so int asym g32 is lossless at b = 4 and the u8 candidate is lossless at b = 8 with g32 (255 =
15 × 17): the g32 columns flatter asymmetric formats.

Writes benchmarks/results/format_mse.json, format_mse.png and the `format_mse` section of
benchmarks/RESULTS.md. Usage: python benchmarks/format_mse.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL = "smollm2-135m"
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def u8_mid(w, bits: int, group: int):
    """The candidate: unsigned 8-bit code on [min, max] per group, truncated to ``bits`` and
    decoded at the centre of the truncated cell; returns (Q(w), bits per weight)."""
    import torch

    from otaro.formats.torch_ref import pad_groups

    k = w.shape[1]
    g = pad_groups(w, group)  # zeros past K, as the product's codecs pad a ragged last group
    g = g.reshape(g.shape[0], -1, group)
    lo = g.amin(-1, keepdim=True).to(torch.float16).to(torch.float32)
    scale = ((g.amax(-1, keepdim=True) - lo) / 255).to(torch.float16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q8 = torch.clamp(torch.round((g - lo) / scale), 0, 255)
    p = 2 ** (8 - bits)
    qb = torch.floor(q8 / p)
    return (lo + (qb * p + (p - 1) / 2) * scale).reshape(w.shape[0], -1)[:, :k], bits + 32 / group


def rows_for(bits: int, group: int):
    """(label, family, quantize(w) -> Q(w), bits per weight) for one cell of the table."""
    from otaro.formats import get_format
    from otaro.formats import torch_ref as Q

    ssfp = get_format(f"ssfp-g{group}-nearest")
    out = [("ssfp-nearest", "one model", lambda w: Q.sefp_quantize(w, ssfp, bits), ssfp.bits_per_weight(bits))]
    for kind in ("asym", "sym"):
        fmt = get_format(f"int{bits}-g{group}-{kind}")

        def q(w, fmt=fmt):
            codes, scale, zero = Q.int_encode(w, fmt)
            return Q.int_dequantize(codes, scale, zero, fmt, w.shape[1])

        out.append((f"int-{kind}", "per bit", q, fmt.bits_per_weight()))
    out.append(("u8-mid (candidate)", "one model", lambda w: u8_mid(w, bits, group)[0], bits + 32 / group))
    return out


def run() -> dict:
    import torch

    from otaro.arch import quantizable_linears
    from otaro.evaluation.run import machine_info
    from otaro.sources import load_source

    t0 = time.perf_counter()
    src = load_source(MODEL)
    weights = [m.weight.detach().to(torch.float32) for m in quantizable_linears(src.model).values()]
    energy = sum(float((w * w).sum()) for w in weights)
    results = []
    with torch.no_grad():
        for group in GROUPS:
            for bits in BITS:
                for label, family, q, bpw in rows_for(bits, group):
                    err = sum(float(((q(w) - w) ** 2).sum()) for w in weights)
                    results.append({"format": label, "family": family, "group": group, "bits": bits,
                                    "bits_per_weight": bpw, "rel_mse": err / energy})
                print(f"g{group} b{bits}: " + "  ".join(f"{r['format']} {r['rel_mse']:.3e}" for r in results[-4:]),
                      flush=True)
    return {"rows": results, "model": MODEL, "linears": len(weights), "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine_info()}


def markdown(r: dict) -> str:
    m = r["machine"]
    out = ["## Weight error of the formats on SmolLM2-135M, RTN (`benchmarks/format_mse.py`)", "",
           f"Produced by `python benchmarks/format_mse.py` in {r['seconds']:.0f} s on {m['processor']}, {m['cpus']} CPUs; "
           f"python {m['python']}, torch {m['torch']}, otaro {m['otaro']}. Relative squared error "
           f"‖Q(W) − W‖² / ‖W‖² over the {r['linears']} quantized linears, round-to-nearest, no calibration. "
           "`u8-mid` is a candidate prototyped in the script (not a format of the product yet): an unsigned "
           "8-bit code on each group's [min, max] (fp16 scale + fp16 minimum), lower b by truncation, "
           "decoded at the centre of the truncated cell.", "",
           "**Caveat:** the weights sit on a 4-bit asymmetric g32 grid (docs/FACTS.md); the g32 columns flatter "
           "asymmetric formats (int asym g32 b4 and u8-mid g32 b8 are lossless).", ""]
    for group in GROUPS:
        sel = [x for x in r["rows"] if x["group"] == group]
        labels = list(dict.fromkeys(x["format"] for x in sel))
        out += [f"### groups of {group}", "", "| format | " + " | ".join(f"b={b}" for b in BITS) + " |",
                "|---|" + "---|" * len(BITS)]
        for label in labels:
            cells = []
            for b in BITS:
                x = next(x for x in sel if x["format"] == label and x["bits"] == b)
                cells.append(f"{x['rel_mse']:.2e} ({x['bits_per_weight']:.3g})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Cells: relative squared error (bits per weight).")
    ratios = []
    for group in GROUPS:
        for b in (3, 4):
            cell = {x["format"]: x["rel_mse"] for x in r["rows"] if x["group"] == group and x["bits"] == b}
            ratios.append(f"g{group} b{b}: {cell['u8-mid (candidate)'] / cell['ssfp-nearest']:.2f}× ssfp, "
                          f"{cell['u8-mid (candidate)'] / cell['int-asym']:.2f}× int asym")
    out += ["", "u8-mid against the shipped one-model row and per-bit int asym RTN: " + "; ".join(ratios) + ".", "",
            "![format weight error](results/format_mse.png)"]
    return "\n".join(out)


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 3.6), sharey=True)
    for ax, group in zip(axes, GROUPS):
        sel = [x for x in r["rows"] if x["group"] == group]
        for label in dict.fromkeys(x["format"] for x in sel):
            pts = sorted((x for x in sel if x["format"] == label), key=lambda x: x["bits"])
            ax.plot([x["bits_per_weight"] for x in pts], [max(x["rel_mse"], 1e-12) for x in pts], "o-",
                    label=label, linestyle="--" if "candidate" in label else "-")
        ax.set_yscale("log")
        ax.set_title(f"groups of {group}")
        ax.set_xlabel("bits per weight")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative squared weight error")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    from otaro.errors import OtaroError
    from results_md import publish

    try:
        result = run()
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    print(publish("format_mse", result, plot, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
