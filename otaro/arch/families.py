"""The built-in adapters. Tiny configs: 2 layers, hidden 64, vocab 320 — enough to exercise
every code path (GQA, ragged groups via odd intermediate sizes, tied/untied heads) in
milliseconds. Intermediate sizes are deliberately not multiples of 64 so padding is tested."""

from __future__ import annotations

from otaro.arch import _LLAMA_LINEARS, ArchAdapter, register_arch

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


register_arch(ArchAdapter("llama", ("llama",), "model.layers", _LLAMA_LINEARS, _llama_cfg))
register_arch(ArchAdapter("qwen2", ("qwen2",), "model.layers", _LLAMA_LINEARS, _qwen2_cfg))
register_arch(ArchAdapter("mistral", ("mistral",), "model.layers", _LLAMA_LINEARS, _mistral_cfg))
register_arch(ArchAdapter("gemma", ("gemma",), "model.layers", _LLAMA_LINEARS, _gemma_cfg))
register_arch(
    ArchAdapter(
        "phi3", ("phi3",), "model.layers",
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"), _phi3_cfg,
    )
)
register_arch(
    ArchAdapter(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        _gpt_neox_cfg, prefix="gpt_neox.",
    )
)
