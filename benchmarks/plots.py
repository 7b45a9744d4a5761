"""Metric panels shared by the benchmark scripts: one panel per dataset, one line per series,
log-scale y; for perplexity, fp32 as a dashed reference (its KLD to itself is 0: no line)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable


def ppl_panels(rows: list[dict], path: Path, *, series: str, x: str, xlabel: str, title: Callable[[str], str],
               style: Callable[[str], str], metric: str = "ppl") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from otaro.io import atomic_file

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), dpi=120, squeeze=False)
    for ax, d in zip(axes[0], datasets):
        groups = defaultdict(list)
        for r in rows:
            if r["dataset"] == d:
                groups[r[series]].append(r)
        for name, pts in groups.items():
            if name == "fp32":
                if metric == "ppl":
                    ax.axhline(pts[0]["ppl"], color="k", ls="--", lw=1, label="fp32")
                continue
            pts.sort(key=lambda r: r["bits"])
            ax.plot([p[x] for p in pts], [p[metric] for p in pts], style(name), ms=5, label=name)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"ppl": "perplexity", "kld": "KL divergence to fp32"}.get(metric, metric) + " (log)")
        ax.set_title(title(d))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)
