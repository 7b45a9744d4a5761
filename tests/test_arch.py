import pytest
import torch
from torch import nn

from otaro.arch import ARCHS, get_adapter, quantizable_linears, supported_model_types
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import UnsupportedArchitecture


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_builds_and_exposes_its_linears(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    assert adapter.name == arch
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


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as e:
        get_adapter("bert")
    for t in supported_model_types():
        assert t in str(e.value)


def test_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    text = "The river ran quietly past the mill."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
