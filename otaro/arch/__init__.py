"""Architecture adapters: where a causal LM keeps its decoder layers and which linears to quantize.

A new Llama-like family is one ``register_arch`` call. Nothing else in otaro branches on model
names: modules, methods and the exporter ask the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from otaro.errors import UnsupportedArchitecture

_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass(frozen=True)
class ArchAdapter:
    name: str
    model_types: tuple[str, ...]  # HF ``config.model_type`` values this adapter serves
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    linear_names: tuple[str, ...]  # linears to quantize, relative to one decoder layer
    tiny_config: Callable[[], object]  # 2-layer, hidden-64 config for tests (no download)
    prefix: str = "model."  # stripped from module names for per-layer precision patterns

    def short_name(self, full_name: str) -> str:
        return full_name[len(self.prefix):] if full_name.startswith(self.prefix) else full_name


ARCHS: dict[str, ArchAdapter] = {}


def register_arch(adapter: ArchAdapter) -> ArchAdapter:
    if adapter.name in ARCHS:
        raise ValueError(f"architecture {adapter.name!r} registered twice")
    ARCHS[adapter.name] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS.values() for t in a.model_types)


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    for adapter in ARCHS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitecture(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


def get_layers(model, adapter: ArchAdapter):
    obj = model
    for part in adapter.layers_path.split("."):
        obj = getattr(obj, part)
    return obj


def quantizable_linears(model, adapter: ArchAdapter | None = None) -> dict[str, object]:
    """Full module name -> module, for every linear the adapter says to quantize, in order."""
    adapter = adapter or get_adapter(model)
    layers = get_layers(model, adapter)
    out = {}
    for i, layer in enumerate(layers):
        for rel in adapter.linear_names:
            mod = layer.get_submodule(rel)
            out[f"{adapter.layers_path}.{i}.{rel}"] = mod
    return out


from otaro.arch import families  # noqa: E402,F401  (registers the built-in adapters)
