"""Meta-tests: every registry entry is exercised somewhere, so a new row cannot go untested."""

import torch

from otaro.arch import ARCHS
from otaro.arch.tiny import tiny_model
from otaro.formats import FORMATS
from otaro.methods import METHODS
from otaro.modules import LINEAR_CLASSES, convert, quant_layers


def test_every_method_runs_on_every_family_it_claims():
    for method in METHODS.values():
        for family in method.families:
            fmt = next(f for f in FORMATS.values() if f.family == family)
            model = method.run(tiny_model("llama"), fmt, None, None, None)
            layers = quant_layers(model)
            assert layers and all(isinstance(l, LINEAR_CLASSES[family]) for l in layers.values())


def test_every_quantized_format_builds_a_layer_that_runs_at_each_of_its_bits():
    torch.manual_seed(0)
    lin = torch.nn.Linear(80, 16)  # 80: a ragged last group for every group size
    x = torch.randn(2, 80)
    for fmt in FORMATS.values():
        if fmt.family == "float":
            continue
        layer = LINEAR_CLASSES[fmt.family].from_linear(lin, fmt)
        bits = fmt.bits if isinstance(fmt.bits, tuple) else (fmt.bits,)
        errs = []
        for b in bits:
            layer.set_bits(b)
            errs.append((layer(x) - lin(x)).abs().max().item())
        assert all(e < 1.0 for e in errs), fmt.name
        assert errs[-1] <= errs[0], fmt.name


def test_every_arch_has_a_tiny_config_with_a_working_model():
    for name, adapter in ARCHS.items():
        assert tiny_model(name).config.model_type in adapter.model_types
