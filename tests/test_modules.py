import pytest
import torch

from otaro.arch.tiny import tiny_model
from otaro.errors import FormatError, OtaroError
from otaro.formats import get_format
from otaro.formats import torch_ref as Q
from otaro.modules import IntLinear, SEFPLinear, convert, get_precision, pack, quant_layers, set_precision

X = torch.tensor([[5, 17, 3, 99, 250, 7]])


def test_packed_layer_computes_with_the_decoded_weight_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 24, bias=True)  # 100 is not a multiple of 64: ragged last group
    fmt = get_format("sefp-g64-trunc")
    mod = SEFPLinear.from_linear(lin, fmt)
    x = torch.randn(3, 100)
    for b in fmt.bits:
        mod.set_bits(b)
        w = Q.sefp_quantize(lin.weight.detach(), fmt, b)
        assert torch.equal(mod(x), torch.nn.functional.linear(x, w, lin.bias))


@pytest.mark.parametrize("fmt", ["sefp-g64-trunc", "sefp-g32-nearest", "sefp-g128-midpoint"])
def test_master_and_packed_forms_agree_bit_exactly(fmt):
    packed, master = tiny_model("llama"), tiny_model("llama")
    convert(packed, fmt, packed=True)
    convert(master, fmt, packed=False)
    for b in get_format(fmt).bits:
        set_precision(packed, b)
        set_precision(master, b)
        assert torch.equal(packed(X).logits, master(X).logits), b


def test_straight_through_gradient_is_the_gradient_of_the_quantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    fmt = get_format("sefp-g64-trunc")
    mod = SEFPLinear.from_linear(lin, fmt, packed=False)
    mod.set_bits(3)
    x = torch.randn(5, 64)
    mod(x).pow(2).sum().backward()
    wq = Q.sefp_quantize(lin.weight.detach(), fmt, 3).requires_grad_(True)
    torch.nn.functional.linear(x, wq).pow(2).sum().backward()
    assert torch.equal(mod.weight.grad, wq.grad)


def test_master_layer_at_full_precision_is_the_plain_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    mod = SEFPLinear.from_linear(lin, get_format("sefp-g64-trunc"), packed=False)
    x = torch.randn(2, 64)
    assert torch.equal(mod(x), lin(x))


def test_set_precision_whole_model_and_per_layer_patterns():
    model = convert(tiny_model("qwen2"), "sefp-g64-trunc")
    model.set_precision(4)
    assert set(model.get_precision().values()) == {4}
    model.set_precision({"*": 3, "layers.0.*": 8, "layers.1.mlp.down_proj": 6})
    prec = get_precision(model)
    assert prec["model.layers.0.self_attn.q_proj"] == 8
    assert prec["model.layers.1.self_attn.q_proj"] == 3
    assert prec["model.layers.1.mlp.down_proj"] == 6
    # the mixed model computes what its layers say: compare with a model set layer by layer
    ref = convert(tiny_model("qwen2"), "sefp-g64-trunc")
    for name, layer in quant_layers(ref).items():
        layer.set_bits(prec[name])
    assert torch.equal(model(X).logits, ref(X).logits)


def test_bad_precision_requests_change_nothing():
    model = convert(tiny_model("llama"), "sefp-g64-trunc")
    model.set_precision(5)
    for bad in (1, 9, {"layers.0.*": 9}, {"layerz.*": 4}, "4"):
        with pytest.raises(FormatError):
            model.set_precision(bad)
        assert set(model.get_precision().values()) == {5}
    with pytest.raises(FormatError):
        model.set_precision(None)  # packed weights have no fp32 master


def test_lower_precision_moves_logits_further_from_fp32():
    ref = tiny_model("llama")(X).logits
    model = convert(tiny_model("llama"), "sefp-g64-trunc")
    errs = []
    for b in range(2, 9):
        model.set_precision(b)
        errs.append((model(X).logits - ref).abs().mean().item())
    assert errs == sorted(errs, reverse=True)


def test_int_model_is_fixed_precision():
    model = convert(tiny_model("llama"), "int4-g64-asym")
    assert all(isinstance(l, IntLinear) for l in quant_layers(model).values())
    model.set_precision(4)
    with pytest.raises(FormatError, match="only SEFP models switch precision"):
        model.set_precision(3)


def test_convert_rejects_non_finite_weights_naming_the_tensor():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj"):
        convert(model, "sefp-g64-trunc")


def test_convert_twice_is_refused_and_pack_turns_master_into_packed():
    model = convert(tiny_model("llama"), "sefp-g64-trunc", packed=False)
    with pytest.raises(OtaroError):
        convert(model, "sefp-g64-trunc")
    set_precision(model, 4)
    before = model(X).logits
    pack(model)
    assert all(l.packed for l in quant_layers(model).values())
    assert torch.equal(model(X).logits, before)
