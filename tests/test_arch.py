import pytest
import torch
from torch import nn

from otaro.arch import ARCHS, TINY_MODELS, get_adapter, quantizable_linears, supported_model_types
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import UnsupportedArchitecture


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_builds_and_exposes_its_linears(name):
    model = tiny_model(name)
    adapter = get_adapter(model)
    assert adapter.name == TINY_MODELS[name].arch
    linears = quantizable_linears(model)
    n_layers = model.config.num_hidden_layers
    assert len(linears) == n_layers * len(adapter.linear_names)
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    # every nn.Linear inside the decoder layers is covered: nothing is silently left in fp32
    layers_path = adapter.layers_path
    inside = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(layers_path + ".")}
    assert inside == set(linears)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)
    assert model.config.vocab_size >= len(tiny_tokenizer())


def test_at_least_four_families_including_a_non_llama_one():
    assert {"llama", "qwen2", "mistral"} <= set(ARCHS)
    assert {"gpt_neox", "phi3", "gemma"} & set(ARCHS)


def test_every_arch_has_its_own_tiny_model_and_variants_name_a_registered_arch():
    assert {n: t.arch for n, t in TINY_MODELS.items() if n in ARCHS} == {a: a for a in ARCHS}
    assert {"llama3", "phi4-mini"} <= set(TINY_MODELS)
    assert {"gemma3_text", "qwen3", "smollm3"} <= set(supported_model_types())


def test_family_quirks_are_in_the_tiny_configs():
    """What each tiny model is for (tests/test_families.py runs the full path on them)."""
    g = tiny_model("gemma3").config
    assert g.sliding_window < 8 and set(g.layer_types) == {"sliding_attention", "full_attention"}
    assert g.tie_word_embeddings and g.final_logit_softcapping and g.query_pre_attn_scalar != g.head_dim
    q = tiny_model("qwen3")
    assert hasattr(q.model.layers[0].self_attn, "q_norm") and q.config.head_dim * 4 != q.config.hidden_size
    assert tiny_model("smollm3").config.no_rope_layers == [1, 0]
    assert tiny_model("llama3").config.rope_scaling["rope_type"] == "llama3"
    p = tiny_model("phi4-mini").config
    assert p.partial_rotary_factor < 1 and p.tie_word_embeddings and p.rope_scaling["type"] == "longrope"


def test_init_std_keeps_a_scaled_embedding_from_dominating():
    # Gemma 3 multiplies embeddings by sqrt(hidden): drawn 1/8 smaller, the tiny model's greedy
    # continuation is varied instead of repeating the last token.
    model = tiny_model("gemma3", init_std=0.15)
    emb = model.get_input_embeddings()
    assert abs(float((emb.weight.detach() * emb.embed_scale).std()) - 0.15) < 0.01
    x = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                         do_sample=False, pad_token_id=0)
    assert len(set(out[0, 24:].tolist())) > 4  # 1 without the rule


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as e:
        get_adapter("bert")
    for t in supported_model_types():
        assert t in str(e.value)


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    text = "The river ran quietly past the mill."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
