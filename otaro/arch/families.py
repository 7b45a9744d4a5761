"""The built-in adapters. Tiny configs: 2 layers, hidden 64, vocab 320 — enough to exercise
every code path (GQA, ragged groups via odd intermediate sizes, tied/untied heads) in
milliseconds. Intermediate sizes are deliberately not multiples of 64 so padding is tested."""

from __future__ import annotations

from otaro.arch import (_LLAMA_LINEARS, LLAMA_SCALE_GROUPS, ArchAdapter, ScaleGroup, TinyModel, register_arch,
                        register_tiny)

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def _llama_cfg():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY, intermediate_size=136, num_key_value_heads=2, tie_word_embeddings=True)


def _qwen2_cfg():
    from transformers import Qwen2Config

    return Qwen2Config(**TINY, intermediate_size=136, num_key_value_heads=2, tie_word_embeddings=False)


def _mistral_cfg():
    from transformers import MistralConfig

    return MistralConfig(**TINY, intermediate_size=136, num_key_value_heads=2, sliding_window=None)


def _gemma_cfg():
    from transformers import GemmaConfig

    return GemmaConfig(**TINY, intermediate_size=136, num_key_value_heads=1, head_dim=16)


def _phi3_cfg():
    from transformers import Phi3Config

    return Phi3Config(**TINY, intermediate_size=136, num_key_value_heads=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _gpt_neox_cfg():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**TINY, intermediate_size=136, rotary_pct=0.25, use_parallel_residual=True)


# AWQ scale groups of the families whose layout is not Llama's (see ScaleGroup).
def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


# Gemma's RMSNorm multiplies by (1 + w).
_GEMMA_SCALE_GROUPS = tuple(ScaleGroup(g.prev, g.linears, g.rows, 1.0) if g.prev.endswith("layernorm") else g
                            for g in LLAMA_SCALE_GROUPS)
# Fused qkv_proj [q; k; v] and gate_up_proj [gate; up].
_PHI3_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
    ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",),
               rows=lambda c, out: range(out - c.num_key_value_heads * _head_dim(c), out)),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), rows=lambda c, out: range(out // 2, out)),
)
# query_key_value is interleaved per head, [q_h; k_h; v_h] for each head h; the MLP's GELU sits
# between its two linears, so dense_4h_to_h has nothing to fold into.
_GPT_NEOX_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("attention.query_key_value",)),
    ScaleGroup("attention.query_key_value", ("attention.dense",),
               rows=lambda c, out: [h * 3 * _head_dim(c) + 2 * _head_dim(c) + d
                                    for h in range(c.num_attention_heads) for d in range(_head_dim(c))]),
    ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
)

register_arch(ArchAdapter("llama", ("llama",), "model.layers", _LLAMA_LINEARS, _llama_cfg))
register_arch(ArchAdapter("qwen2", ("qwen2",), "model.layers", _LLAMA_LINEARS, _qwen2_cfg))
register_arch(ArchAdapter("mistral", ("mistral",), "model.layers", _LLAMA_LINEARS, _mistral_cfg))
register_arch(ArchAdapter("gemma", ("gemma",), "model.layers", _LLAMA_LINEARS, _gemma_cfg,
                          scale_groups=_GEMMA_SCALE_GROUPS))
register_arch(
    ArchAdapter(
        "phi3", ("phi3",), "model.layers",
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"), _phi3_cfg,
        scale_groups=_PHI3_SCALE_GROUPS,
    )
)
register_arch(
    ArchAdapter(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        _gpt_neox_cfg, prefix="gpt_neox.", scale_groups=_GPT_NEOX_SCALE_GROUPS,
    )
)


# -- families added for on-device deployment (Gemma 3, Qwen3, SmolLM3) and tiny variants of
# existing families that exercise one more quirk (Llama 3.x rope scaling, Phi-4-mini) --------


def _gemma3_cfg():
    from transformers import Gemma3TextConfig

    # Quirks exercised: a sliding-window layer interleaved with a global one (window 4, far
    # shorter than any test sequence, so the sliding mask and the local rope base are really
    # used), q/k RMSNorms, sqrt(hidden) embedding scaling, (1 + w) RMSNorm, tied head, a
    # query_pre_attn_scalar that is not head_dim, and final logit soft-capping (Gemma 2 style;
    # Gemma 3 checkpoints leave it unset, but the config field exists and the loss honours it).
    return Gemma3TextConfig(
        **TINY, intermediate_size=136, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def _qwen3_cfg():
    from transformers import Qwen3Config

    # q/k RMSNorms, and head_dim (24) != hidden / heads (16), as in Qwen3-0.6B (128 vs 64).
    return Qwen3Config(**TINY, intermediate_size=136, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)


def _smollm3_cfg():
    from transformers import SmolLM3Config

    # NoPE: layer 1 has no rotary embedding (SmolLM3-3B drops it in every 4th layer). Its
    # default special ids (128000+) are outside a 320-token vocabulary.
    return SmolLM3Config(**TINY, intermediate_size=136, num_key_value_heads=2, no_rope_layers=[1, 0],
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _llama3_cfg():
    from transformers import LlamaConfig

    # Llama 3.x rope scaling. With head_dim 16 and original length 64 the rotary wavelengths
    # (6, 32, 167, ... positions) fall in all three regimes of the llama3 rule: kept, smoothed,
    # divided by the factor.
    return LlamaConfig(**TINY, intermediate_size=136, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


LONGROPE_ORIGINAL = 32  # the tiny Phi-4-mini's switch point from short to long rope factors


def _phi4_mini_cfg():
    from transformers import Phi3Config

    # Phi-4-mini is model_type phi3 with partial rotary (0.75), a tied head and LongRoPE: short
    # factors up to original_max_position_embeddings, long factors beyond (and the KV cache is
    # recomputed when a sequence crosses it, see otaro.arch.rope). The switch point (32) is
    # above the exporter's validation length (16 + 8 tokens) and below the tests' sequences.
    rotary_half = int(16 * 0.75) // 2
    return Phi3Config(
        **TINY, intermediate_size=136, num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
                      "long_factor": [2.0 ** i for i in range(rotary_half)]},
    )


# Gemma 3: (1 + w) norms, and the MLP reads pre_feedforward_layernorm (post_attention_layernorm
# normalises the attention output before the residual add).
register_arch(ArchAdapter("gemma3", ("gemma3_text",), "model.layers", _LLAMA_LINEARS, _gemma3_cfg,
                          scale_groups=(ScaleGroup("input_layernorm", _LLAMA_LINEARS[:3], norm_offset=1.0),
                                        LLAMA_SCALE_GROUPS[1],
                                        ScaleGroup("pre_feedforward_layernorm", _LLAMA_LINEARS[4:6], norm_offset=1.0),
                                        LLAMA_SCALE_GROUPS[3])),
              tiny_bos=True)  # Gemma's and Llama 3's tokenizers put a BOS first: so do their tiny ones
register_arch(ArchAdapter("qwen3", ("qwen3",), "model.layers", _LLAMA_LINEARS, _qwen3_cfg))
register_arch(ArchAdapter("smollm3", ("smollm3",), "model.layers", _LLAMA_LINEARS, _smollm3_cfg))
register_tiny(TinyModel("llama3", "llama", _llama3_cfg, bos=True))
register_tiny(TinyModel("phi4-mini", "phi3", _phi4_mini_cfg))
