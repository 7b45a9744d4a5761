"""The fine-tuning loss, computed without materialising full-vocabulary logits for the batch.

A causal LM's loss is ``mean_t CE(lm_head(h_t), y_{t+1})``. The Hugging Face forward builds the
whole ``[batch, seq, vocab]`` logits tensor, upcasts it to fp32 and keeps its log-softmax for the
backward: for SmolLM2 (vocab 49152) at batch 8 x 512 that is 0.8 GB per copy and several copies
live at once; for a 262k vocabulary it is 4.3 GB per copy, which is what killed the 270M run.

Here the model *body* (``model.base_model``: embeddings, decoder layers, final norm) runs once,
and the head is applied to ``chunk`` positions at a time. Each chunk runs under
``torch.utils.checkpoint`` so its logits are freed right after the forward and recomputed, one
chunk at a time, in the backward: the peak holds one chunk's logits (plus its gradient) instead
of the whole batch's. The cost is a second head matmul per chunk in the backward (the head is a
few percent of a step's FLOPs). Positions whose label is ``-100`` are dropped before the head,
so prompt tokens of prompt/response data cost nothing.

The same path computes the distillation KL (student and teacher logits chunk by chunk) and the
held-out loss (no grad, no checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from otaro.errors import OtaroError
from otaro.training.data import IGNORE_INDEX

# fp32 logits per chunk. 64 MiB keeps the chunk (and the same-sized gradient and log-softmax of
# its backward) small next to a step's activations: 341 positions for vocab 49152.
LOGITS_CHUNK_BYTES = 64 * 2**20
# ...but never fewer positions than this. Every chunk's backward produces a [vocab, hidden]
# gradient of the head and adds it into the head's gradient, so that memory traffic is paid
# once per chunk: with 256 positions the chunk's head matmuls do ~170 FLOPs per byte of it,
# enough to stay compute-bound even on a GPU (a 64-position chunk for a 262k vocabulary would
# double a GPU step). It costs memory only for huge vocabularies (262144: 256 MiB per chunk).
MIN_CHUNK_POSITIONS = 256


def chunk_positions(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Positions per head chunk: one chunk's fp32 logits fit ``budget_bytes`` (default
    ``LOGITS_CHUNK_BYTES``), but at least ``MIN_CHUNK_POSITIONS``."""
    budget = LOGITS_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(MIN_CHUNK_POSITIONS, budget // (4 * int(vocab_size)))


def body_and_head(model) -> tuple[nn.Module, nn.Module]:
    """The decoder body (returns the final-normed hidden states) and the LM head of a
    transformers causal LM. ``base_model`` / ``get_output_embeddings`` are where every
    registered architecture keeps them (``model`` + ``lm_head``; GPT-NeoX: ``gpt_neox`` +
    ``embed_out``); a tied head is the embedding matrix, used as is."""
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is model:
        # Gemma 3's text model declares no base_model_prefix (its multimodal sibling owns
        # "model"): the adapter's module prefix names the body instead.
        from otaro.arch import get_adapter

        body = model.get_submodule(get_adapter(model).prefix.rstrip("."))
    if body is None or body is model or head is None:
        raise OtaroError(f"{type(model).__name__}: cannot find the decoder body and LM head for the chunked loss")
    return body, head


def _head(model, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits for hidden states ``h``, with the post-head transforms some families apply
    in their own forward (so the loss equals the model's own)."""
    logits = head(h).float()
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_terms(model, head, h, y, t_model, t_head, t_h, temperature: float):
    """Summed CE (and summed KL when a teacher chunk is given) over one chunk of positions."""
    logits = _head(model, head, h)
    ce = F.cross_entropy(logits, y, reduction="sum")
    if t_h is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        t = F.log_softmax(_head(t_model, t_head, t_h) / temperature, -1)
    s = F.log_softmax(logits / temperature, -1)
    return ce, F.kl_div(s, t, log_target=True, reduction="sum")


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, teacher=None, distill: float = 0.0,
                   temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose (shifted) label is not -100, plus
    ``distill * T^2 *`` the mean KL(teacher || student) of the temperature-T distributions over
    the same positions (``F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")`` on
    the flattened positions).

    Equal to ``model(input_ids, labels=labels).loss`` (up to the order of fp32 sums). A batch
    with no labelled position gives 0 rather than the 0/0 NaN of a plain mean, so one
    fully-masked block cannot poison the weights; the head still runs (on zero rows) so every
    parameter is in the graph, as DDP requires of each rank's backward.
    """
    body, head = body_and_head(model)
    h = body(input_ids=input_ids, use_cache=False, return_dict=True).last_hidden_state
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    h, y = h[:, :-1][keep], y[keep]  # [n, hidden], [n]: only positions that are trained
    n = y.numel()
    if n == 0:
        return _head(model, head, h).sum() * 0.0
    t_h = t_head = None
    if teacher is not None and distill > 0:
        t_body, t_head = body_and_head(teacher)
        with torch.no_grad():
            t_h = t_body(input_ids=input_ids, use_cache=False, return_dict=True).last_hidden_state[:, :-1][keep]
    chunk = chunk or chunk_positions(model.config.vocab_size)
    # Checkpoint only when a backward will follow: in eval / no_grad there is nothing to save.
    recompute = torch.is_grad_enabled() and h.requires_grad
    ce_sum = kl_sum = h.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        args = (model, head, h[s : s + chunk], y[s : s + chunk], teacher, t_head,
                None if t_h is None else t_h[s : s + chunk], temperature)
        if recompute:
            ce, kl = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, kl = _chunk_terms(*args)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    loss = ce_sum / n
    if t_h is not None:
        loss = loss + distill * (kl_sum / n) * temperature * temperature
    return loss


class LossModel(nn.Module):
    """The causal LM with :func:`causal_lm_loss` as its forward.

    The trainer hands *this* module to ``accelerator.prepare``: DDP only synchronises gradients
    of a backward whose forward ran through the DDP wrapper, and the chunked loss has to call
    the body and the head separately, so the whole loss must be the wrapped module's forward.
    The teacher is kept outside the module tree (in a tuple) so DDP neither broadcasts nor
    tracks its frozen weights, and the state dict of ``.lm`` stays the model's own.
    """

    def __init__(self, lm: nn.Module, teacher: nn.Module | None = None, distill: float = 0.0,
                 temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self._teacher = (teacher,)
        self.distill, self.temperature = float(distill), float(temperature)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.lm, input_ids, labels, teacher=self._teacher[0], distill=self.distill,
                              temperature=self.temperature)
