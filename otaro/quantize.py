"""``otaro quantize``: load a model, apply a registered method, write a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from otaro.errors import FormatError, OtaroError
from otaro.formats import DEFAULT_SEFP, get_format

QUANTIZE_CONFIG_VERSION = 1


@dataclass(frozen=True)
class QuantizeConfig:
    model: str
    output: str
    method: str = "rtn"
    format: str = DEFAULT_SEFP
    overwrite: bool = False
    version: int = QUANTIZE_CONFIG_VERSION

    def __post_init__(self):
        from otaro.methods import get_method

        fmt = get_format(self.format)
        method = get_method(self.method)
        if fmt.family not in method.families:
            raise FormatError(f"method {self.method} cannot produce {fmt.family} formats ({fmt.name})")
        out = Path(self.output)
        if out.exists() and not self.overwrite:
            raise OtaroError(f"output folder {out} already exists (pass --overwrite to replace it)")


def quantize(config: QuantizeConfig, progress=None) -> Path:
    """Run the method and save the checkpoint; returns the output folder."""
    from otaro import checkpoint
    from otaro.methods import get_method
    from otaro.sources import load_source

    src = load_source(config.model)
    if src.kind == "checkpoint":
        raise OtaroError(f"{config.model} is already quantized; quantize the original model")
    fmt = get_format(config.format)
    method = get_method(config.method)
    model = method.run(src.model, fmt, config, None, progress)
    extra = {"method": {"name": method.name, "config": asdict(config)}, "source": {"model": config.model, "kind": src.kind}}
    return checkpoint.save(model, config.output, tokenizer=src.tokenizer, overwrite=config.overwrite, extra=extra)
