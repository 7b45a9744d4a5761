"""Meta-tests: every registry entry is exercised somewhere, so a new row cannot go untested."""

import torch

from otaro.arch import ARCHS
from otaro.arch.tiny import tiny_model
from otaro.formats import FORMATS
from otaro.methods import METHODS
from otaro.modules import LINEAR_CLASSES, convert, quant_layers


def test_every_method_runs_on_every_family_it_claims():
    from otaro.quantize import QuantizeConfig

    for method in METHODS.values():
        for family in method.families:
            fmt = next(f for f in FORMATS.values() if f.family == family)
            calib = None
            config = None
            if method.needs_calibration or method.target_bits:
                # a config as `otaro quantize` builds it (targets normalised), plus a few windows
                config = QuantizeConfig.__new__(QuantizeConfig)
                defaults = QuantizeConfig.__dataclass_fields__
                for k, f in defaults.items():
                    object.__setattr__(config, k, f.default)
                bits = ((fmt.bits, 1.0),) if family == "int" else ((3, 1.0), (8, 1.0))
                object.__setattr__(config, "bits", bits)
                calib = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
            model = method.run(tiny_model("llama"), fmt, config, calib, None)
            layers = quant_layers(model)
            assert layers and all(isinstance(l, LINEAR_CLASSES[family]) for l in layers.values()), method.name


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
