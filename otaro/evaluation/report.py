"""Eval results as a terminal table, JSON and a PNG plot (perplexity vs bits, one line per text;
a second panel with KL divergence to the reference vs bits when it was measured)."""

from __future__ import annotations

import io
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from otaro.io import WRITE_ERRNOS, atomic_file, cannot_write, write_json


def _row_key(row: dict) -> tuple:
    return (row["label"], -1 if row["bits"] is None else row["bits"])


def _has_kld(rows: Sequence[dict]) -> bool:
    return any(r.get("kld") is not None for r in rows)


def _fidelity_cells(r: dict | None) -> list[str]:
    if r is None:
        return ["", "", ""]
    if r.get("kld") is None:
        return ["-", "-", "-"]
    return [f"{r['kld']:.4g}", f"{r['kld_p99']:.4g}", f"{100 * r['top1']:.2f}"]


def _bos_line(rows: Sequence[dict]) -> str:
    """Says whether the windows were read after the model's BOS (rows of older reports: nothing)."""
    flags = {r["bos"] for r in rows if "bos" in r}
    if not flags:
        return ""
    return ("windows read after the model's BOS (not scored)" if flags == {True}
            else "windows read without a BOS (the tokenizer adds none)")


def table(rows: Sequence[dict], title: str = ""):
    """A rich Table: one line per (format, bits), perplexity and bits/byte per text, and when a
    reference was measured its mean and 99th-percentile KLD (nats/token) and top-1 agreement (%)."""
    from rich.table import Table

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fidelity = _has_kld(rows)
    bos = _bos_line(rows)
    title = "\n".join(x for x in (title, bos) if x)
    t = Table(title=title or None, show_lines=False)
    t.add_column("format")
    t.add_column("bits", justify="right")
    t.add_column("bits/weight", justify="right")
    for d in datasets:
        t.add_column(f"{d} ppl", justify="right")
        t.add_column(f"{d} bpb", justify="right")
        if fidelity:
            t.add_column(f"{d} KLD", justify="right")
            t.add_column(f"{d} p99", justify="right")
            t.add_column(f"{d} top-1%", justify="right")
    grouped: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        grouped[_row_key(r)][r["dataset"]] = r
    for key in sorted(grouped, key=lambda k: (k[0] != "fp32", k[0], k[1])):
        by_d = grouped[key]
        first = next(iter(by_d.values()))
        cells = [first["label"], "-" if first["bits"] is None else str(first["bits"]), f"{first['bits_per_weight']:.3f}"]
        for d in datasets:
            r = by_d.get(d)
            cells += [f"{r['ppl']:.2f}", f"{r['bpb']:.4f}"] if r else ["", ""]
            if fidelity:
                cells += _fidelity_cells(r)
        t.add_row(*cells)
    return t


def table_text(rows: Sequence[dict], title: str = "", width: int = 120) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table(rows, title))
    return buf.getvalue()


def plot(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Perplexity (log scale) vs bit-width; unquantized rows drawn as dashed horizontal lines.
    With KLD measured, a second panel shows it (log scale) vs bit-width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if _has_kld(rows):
        fig, (ax, kax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        kax = None
    series: dict[tuple, list] = defaultdict(list)
    for r in rows:
        series[(r["dataset"], r["label"])].append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dcolor = {d: colors[i % len(colors)] for i, d in enumerate(dict.fromkeys(r["dataset"] for r in rows))}
    styles = ["-o", "--s", ":^", "-.v", "-D", "--x"]
    labels = [l for l in dict.fromkeys(r["label"] for r in rows) if l != "fp32"]
    for (dataset, label), pts in series.items():
        if label == "fp32":
            ax.axhline(pts[0]["ppl"], color=dcolor[dataset], ls="--", lw=1, alpha=0.7, label=f"{dataset} fp32")
            continue
        pts = sorted(pts, key=lambda r: r["bits"])
        style = styles[labels.index(label) % len(styles)]
        ax.plot([p["bits"] for p in pts], [p["ppl"] for p in pts], style, color=dcolor[dataset], label=f"{dataset} {label}")
        # KLD 0 (the reference itself) has no place on a log axis
        kpts = [p for p in pts if p.get("kld") is not None and p["kld"] > 0]
        if kax is not None and kpts:
            kax.plot([p["bits"] for p in kpts], [p["kld"] for p in kpts], style, color=dcolor[dataset],
                     label=f"{dataset} {label}")
    ax.set_yscale("log")
    ax.set_xlabel("weight bit-width b")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7)
    if kax is not None:
        kax.set_yscale("log")
        kax.set_xlabel("weight bit-width b")
        kax.set_ylabel("mean KL(ref || quantized), nats/token (log scale)")
        kax.grid(True, which="both", alpha=0.3)
        kax.set_title("KL divergence to the reference")
        if kax.lines:
            kax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def save(report: dict, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "eval.json", report)
        png = plot(report["rows"], out_dir / "eval.png", title)
    except BaseException as e:
        # A folder this call created holds nothing worth keeping if both files did not make it.
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise cannot_write(out_dir, e) from None
        raise
    return {"json": out_dir / "eval.json", "png": png}
