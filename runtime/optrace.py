"""Where a session's time goes, from onnxruntime's profile (torch-free).

onnxruntime's profile is a chrome-trace JSON list: one ``model_run`` event (category
"Session") per ``InferenceSession.run`` and one ``<node>_kernel_time`` event (category "Node",
``args.op_name``) per node executed. :func:`op_breakdown` sums the node events of the runs it is
asked about by op type. The gap between the runs' wall time and the sum of kernel times is what
onnxruntime spends between kernels (scheduling, allocation, per-node dispatch): on a small model
with thousands of nodes per token that gap and the shape-computing nodes, not the weight
matmuls, are much of a decode step.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from otaro.errors import OtaroError


@dataclass(frozen=True)
class OpTime:
    op: str
    ms_per_run: float
    nodes_per_run: float
    share: float  # of the summed kernel time


@dataclass(frozen=True)
class Breakdown:
    runs: int
    run_ms: float  # median wall time of one run
    kernel_ms: float  # mean summed kernel time of one run
    nodes_per_run: float
    ops: tuple[OpTime, ...]  # largest first

    @property
    def between_kernels_ms(self) -> float:
        return max(0.0, self.run_ms - self.kernel_ms)


def read_trace(path: str | Path) -> list[dict]:
    try:
        events = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OtaroError(f"{path} is not an onnxruntime profile: {e}") from None
    if not isinstance(events, list):
        raise OtaroError(f"{path} is not an onnxruntime profile (expected a JSON list of events)")
    return [e for e in events if isinstance(e, dict)]


def op_breakdown(events: list[dict], skip: int = 0) -> Breakdown:
    """Per-op-type kernel time of the model runs after the first ``skip`` (e.g. 1: leave the
    prefill out and keep the decode steps). Node events are matched to the run whose time span
    holds them (onnxruntime timestamps are µs since the session started)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip:]
    if not runs:
        raise OtaroError(f"the profile has no model run after the first {skip}")
    starts = [r["ts"] for r in runs]
    ends = [r["ts"] + r["dur"] for r in runs]
    by: dict[str, list[float]] = {}
    count = 0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e.get("ts", -1)
        i = bisect.bisect_right(starts, ts) - 1  # the last run that started at or before the node
        if i < 0 or ts > ends[i]:
            continue
        op = (e.get("args") or {}).get("op_name", "?")
        acc = by.setdefault(op, [0.0, 0])
        acc[0] += e.get("dur", 0)
        acc[1] += 1
        count += 1
    n = len(runs)
    total = sum(v[0] for v in by.values()) or 1.0
    ops = tuple(sorted((OpTime(op, v[0] / n / 1000, v[1] / n, v[0] / total) for op, v in by.items()),
                       key=lambda o: -o.ms_per_run))
    durs = sorted(r["dur"] for r in runs)
    return Breakdown(n, durs[n // 2] / 1000, sum(v[0] for v in by.values()) / n / 1000, count / n, ops)
