"""Perplexity and bits-per-byte of a causal LM over token windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from otaro.evaluation.data import Windows


@dataclass(frozen=True)
class Score:
    nll: float  # summed natural-log loss over predicted tokens
    tokens: int
    bytes: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpb(self) -> float:
        # bits per UTF-8 byte: comparable across tokenizers, unlike perplexity
        return self.nll / math.log(2) / self.bytes


@torch.inference_mode()
def score(model, windows: Windows, batch_size: int = 1, progress=None) -> Score:
    nll, count = 0.0, 0
    for i in range(0, len(windows.tokens), batch_size):
        batch = windows.tokens[i : i + batch_size].to(next(model.parameters()).device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        nll += float(loss)
        count += target.numel()
        if progress:
            progress(len(batch))
    return Score(nll, count, sum(windows.predicted_bytes))
