"""Training logs and plots: a JSONL log, the bit-width path and loss per bit-width over steps."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from otaro.io import atomic_file


class JsonlLog:
    """Append-only JSONL log. On resume, lines after the resumed step are dropped first so the
    log reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if truncate_after_step is not None and self.path.exists():
            keep = [l for l in self.path.read_text(encoding="utf-8").splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= truncate_after_step]
            with atomic_file(self.path, "w") as f:
                f.write("".join(l + "\n" for l in keep))
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def plot_training(log: list[dict], path: Path, title: str = "") -> Path:
    """Two panels: the path (bit-width per step) and the training loss per bit-width (EMA),
    with held-out evaluations as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in log if "bits" in r and "loss" in r]
    evals = [r for r in log if "eval" in r]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=110, sharex=True,
                                   gridspec_kw={"height_ratios": [1, 2]})
    # every step is one optimizer update: "step" uses its own gradient, "laa" the running mean of
    # the recent low-bit gradients
    kinds = {"step": ("tab:blue", "own gradient"), "laa": ("tab:orange", "LAA low-bit mean")}
    for kind, (color, label) in kinds.items():
        pts = [r for r in steps if r.get("update") == kind]
        if pts:
            ax1.scatter([r["step"] for r in pts], [r["bits"] for r in pts], s=6, color=color, label=label)
    ax1.set_ylabel("bit-width")
    ax1.set_title(title or "bit-width path")
    ax1.legend(fontsize=7, loc="upper right", ncol=3)
    ax1.grid(alpha=0.3)
    by_bits = defaultdict(list)
    for r in steps:
        by_bits[r["bits"]].append(r)
    cmap = plt.get_cmap("viridis")
    all_bits = sorted(by_bits)
    for i, b in enumerate(all_bits):
        pts, ema, xs, ys = by_bits[b], None, [], []
        for r in pts:
            ema = r["loss"] if ema is None else 0.8 * ema + 0.2 * r["loss"]
            xs.append(r["step"])
            ys.append(ema)
        ax2.plot(xs, ys, color=cmap(i / max(1, len(all_bits) - 1)), lw=1.2, label=f"b={b} train")
        ev = [(r["step"], r["eval"][str(b)]) for r in evals if str(b) in r["eval"]]
        if ev:
            ax2.plot(*zip(*ev), "o", color=cmap(i / max(1, len(all_bits) - 1)), ms=4)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss (EMA; dots: held-out)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)
