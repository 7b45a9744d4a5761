"""Next-token choice in numpy: greedy, or sampling with temperature, top-k and top-p.

Temperature 0 (or top-k 1) is greedy: the first arg-max, the same token torch's ``argmax``
picks. Sampling draws from ``numpy.random.default_rng(seed)``, one generator per request, rows
of a batch in order, so a seeded request gives the same tokens on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from otaro.errors import OtaroError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise OtaroError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise OtaroError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise OtaroError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Next token of every row of ``logits`` [B, V]."""
        if self.cfg.greedy:
            return np.argmax(logits, axis=-1)
        return np.array([self._sample(row) for row in logits], np.int64)

    def _sample(self, logits: np.ndarray) -> int:
        cfg = self.cfg
        z = logits.astype(np.float64) / cfg.temperature
        if cfg.top_k is not None and cfg.top_k < z.size:
            kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if cfg.top_p is not None and cfg.top_p < 1:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # The smallest set of most likely tokens whose mass reaches top_p (always >= 1 token).
            keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(min(np.searchsorted(np.cumsum(p), self.rng.random(), side="right"), p.size - 1))
