"""Rotary embeddings whose frequencies depend on the sequence being run, for the exporter.

transformers picks the frequencies of some rope types inside the rotary module's forward with a
Python ``if`` on a tensor (``modeling_rope_utils.dynamic_rope_update``). The TorchScript tracer
freezes such a branch at the dummy input's length, so the exported graph would silently keep
one set of frequencies for every length. Each rope type whose frequencies are not fixed at
init is a row here: how to trace it faithfully, and whether a KV-cache decoder must recompute
its cache at some length (:func:`cache_reset_length`, recorded in the ONNX metadata under
:data:`RESET_KEY` and honoured by ``otaro.runtime.decoder``). Static types (default, linear,
llama3, yarn) need no row: their frequencies are constants of the graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from otaro.errors import OtaroError

# ONNX metadata key: total sequence length after which the past must be recomputed (see longrope).
RESET_KEY = "otaro.recompute_past_after"


@dataclass(frozen=True)
class RopeRule:
    rope_type: str
    # module -> forward(x, position_ids) to use while tracing; None: this type cannot be traced
    traceable: Callable | None
    # config -> total length after which a KV cache is stale (None: never)
    reset_length: Callable[[object], int | None] = lambda config: None
    why: str = ""


ROPE_RULES: dict[str, RopeRule] = {}


def register_rope_rule(rule: RopeRule) -> RopeRule:
    ROPE_RULES[rule.rope_type] = rule
    return rule


def rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        return scaling.get("rope_type", scaling.get("type")) or "default"
    return "default"


def _original_length(config) -> int:
    return getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings


def _traceable_longrope(module) -> Callable:
    """LongRoPE (Phi-3/Phi-4 long-context models): short factors while a sequence fits
    ``original_max_position_embeddings``, long factors beyond. transformers decides with
    ``if max(position_ids) + 1 > original`` over the whole batch; here both frequency sets are
    constants of the graph and a ``Where`` picks one *per row* (a row's longest position), so a
    left-padded batch row gets what it gets alone — the runtime's batch contract; for one
    sequence it is transformers' rule. The rest is transformers' default rotary forward
    (cos/sin of positions x inverse frequencies, times the attention factor), in float32."""
    import torch

    original = _original_length(module.config)
    short = module.original_inv_freq.float()
    long = module.rope_init_fn(module.config, short.device, seq_len=original + 1)[0].float()

    def forward(x, position_ids):
        use_long = (position_ids.max(dim=-1, keepdim=True).values + 1) > original  # [batch, 1]
        inv_freq = torch.where(use_long[:, :, None], long[None, :, None], short[None, :, None])
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * module.attention_scaling
        sin = emb.sin() * module.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    return forward


register_rope_rule(RopeRule(
    "longrope", _traceable_longrope, _original_length,
    # Keys cached with the short factors are wrong once a sequence is longer than the original
    # length: transformers' Phi-3 generate drops its cache and re-runs the whole sequence at that
    # point (Phi3ForCausalLM.prepare_inputs_for_generation); our decoder does the same.
))
for _dynamic in ("dynamic", "dynamic_ntk"):
    register_rope_rule(RopeRule(
        _dynamic, None,
        why="its frequencies are recomputed from the longest sequence seen so far (state kept across calls)",
    ))


def _rotary_modules(model):
    """Every transformers rotary-embedding module (they all carry ``rope_type`` and ``rope_init_fn``)."""
    return [m for m in model.modules() if hasattr(m, "rope_type") and hasattr(m, "rope_init_fn")]


@contextlib.contextmanager
def traceable_rope(model):
    """While tracing ``model``: rotary modules of a registered dynamic type run a traceable
    forward; a type that cannot be traced is an ``OtaroError`` before anything is exported."""
    patched = []
    try:
        for module in _rotary_modules(model):
            rule = ROPE_RULES.get(module.rope_type)
            if rule is None:
                continue
            if rule.traceable is None:
                raise OtaroError(f"rope_scaling type {module.rope_type!r} cannot be exported to ONNX: {rule.why}")
            module.forward = rule.traceable(module)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def cache_reset_length(config) -> int | None:
    """Total length after which a KV-cache decoder of ``config`` must recompute its past."""
    rule = ROPE_RULES.get(rope_type(config))
    return None if rule is None else rule.reset_length(config)
