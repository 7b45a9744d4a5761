"""Perplexity and bits-per-byte of a causal LM over token windows, and its fidelity to a
reference model over the same windows (KL divergence and top-1 agreement, as llama.cpp's
``--kl-divergence`` reports)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from otaro.evaluation.data import Windows

# Rows of [positions, vocab] handled at once in float64: bounds the temporaries (~100 MB at a
# 49k vocabulary) whatever the batch size.
_FIDELITY_CHUNK = 256


@dataclass(frozen=True)
class Score:
    nll: float  # summed natural-log loss over predicted tokens
    tokens: int
    bytes: int
    kld: float | None = None  # mean KL(P_ref || P_model), nats per predicted token
    kld_p99: float | None = None  # 99th percentile of the per-token KL
    top1: float | None = None  # fraction of positions where both argmaxes agree

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpb(self) -> float:
        # bits per UTF-8 byte: comparable across tokenizers, unlike perplexity
        return self.nll / math.log(2) / self.bytes


def fidelity(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(P_ref || P_q) in nats (float64) and top-1 agreement (bool).

    ``ref_logprobs`` is the reference's log-softmax, ``logits`` the evaluated model's raw logits,
    both ``[..., vocab]``. The log-softmax is taken in float32 and the KL accumulated in float64,
    so a model compared with its own log-probs gives exactly 0."""
    if ref_logprobs.shape != logits.shape:
        raise ValueError(f"reference log-probs {tuple(ref_logprobs.shape)} and logits {tuple(logits.shape)} differ")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    ref = ref_logprobs.reshape(-1, vocab).to(logits.device, torch.float32)
    lq_all = F.log_softmax(logits.reshape(-1, vocab).float(), dim=-1)
    kl = torch.empty(ref.shape[0], dtype=torch.float64, device=logits.device)
    for i in range(0, ref.shape[0], _FIDELITY_CHUNK):
        lp, lq = ref[i : i + _FIDELITY_CHUNK].double(), lq_all[i : i + _FIDELITY_CHUNK].double()
        p = lp.exp()
        # 0 · log(0/q) = 0: tokens the reference rules out contribute nothing (and no NaN)
        kl[i : i + _FIDELITY_CHUNK] = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    top1 = ref.argmax(-1) == lq_all.argmax(-1)
    return kl.reshape(lead), top1.reshape(lead)


def summarize_fidelity(kl: np.ndarray, top1: np.ndarray) -> dict[str, float]:
    """``{"kld", "kld_p99", "top1"}`` from per-token values."""
    return {"kld": float(np.mean(kl)), "kld_p99": float(np.percentile(kl, 99)), "top1": float(np.mean(top1))}


@torch.inference_mode()
def score(model, windows: Windows, batch_size: int = 1, progress=None, reference=None, record=None) -> Score:
    """Score ``model`` on ``windows``. ``reference``: the reference log-probs of these windows,
    ``[windows, seq_len - 1, vocab]`` (tensor or numpy array, e.g. a memmap), to also measure
    KL divergence and top-1 agreement from the same forward passes. ``record``: an array of that
    shape to fill with this model's float32 log-softmax (how the reference log-probs are made)."""
    nll, count = 0.0, 0
    kls, top1s = [], []
    device = next(model.parameters()).device
    seq_len = windows.tokens.shape[1]
    for i in range(0, len(windows.tokens), batch_size):
        batch = windows.tokens[i : i + batch_size].to(device)
        inputs = windows.model_inputs(i, i + batch_size).to(device)  # with the BOS first, if any
        # the logits that predict tokens 1..seq_len-1 of each window (not the BOS position's)
        logits = model(input_ids=inputs, use_cache=False).logits[:, -seq_len:-1].float()
        target = batch[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        nll += float(loss)
        count += target.numel()
        if record is not None:
            record[i : i + batch_size] = F.log_softmax(logits, dim=-1).cpu().numpy()
        if reference is not None:
            kl, top1 = fidelity(torch.as_tensor(reference[i : i + batch_size]), logits)
            kls.append(kl.reshape(-1).cpu().numpy())
            top1s.append(top1.reshape(-1).cpu().numpy())
        if progress:
            progress(len(batch))
    extra = summarize_fidelity(np.concatenate(kls), np.concatenate(top1s)) if kls else {}
    return Score(nll, count, sum(windows.predicted_bytes), **extra)
