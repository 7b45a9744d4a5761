"""Architecture adapters: where a causal LM keeps its decoder layers and which linears to quantize.

A new Llama-like family is one ``register_arch`` call. Nothing else in otaro branches on model
names: modules, methods and the exporter ask the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from otaro.errors import UnsupportedArchitecture

_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ: ``linears`` (relative to a decoder layer) all read the output of ``prev``, so a
    per-input-channel scale s can be folded exactly: prev's output divided by s, the linears'
    input columns multiplied by s. ``prev`` is a norm (its weight, and bias, are divided; the
    norm multiplies by ``norm_offset + weight``: Gemma's (1 + w) has offset 1) or a linear
    whose output rows ``rows(config, out_features)`` (default: all) feed the linears, in their
    input order (fused qkv / gate_up layouts). A group whose shapes do not match (GQA v -> o) or
    whose fold does not leave the float block output unchanged is skipped, never forced."""

    prev: str
    linears: tuple[str, ...]
    rows: Callable[[object, int], Sequence[int]] | None = None
    norm_offset: float = 0.0


# The standard decoder layout (Llama, Qwen2/3, Mistral, SmolLM3): the default of every adapter.
LLAMA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class ArchAdapter:
    name: str
    model_types: tuple[str, ...]  # HF ``config.model_type`` values this adapter serves
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    linear_names: tuple[str, ...]  # linears to quantize, relative to one decoder layer
    tiny_config: Callable[[], object]  # 2-layer, hidden-64 config for tests (no download)
    prefix: str = "model."  # stripped from module names for per-layer precision patterns
    # AWQ: which op feeds which linears (``ScaleGroup``); families that differ set their own.
    scale_groups: tuple[ScaleGroup, ...] = LLAMA_SCALE_GROUPS

    def short_name(self, full_name: str) -> str:
        return full_name[len(self.prefix):] if full_name.startswith(self.prefix) else full_name


@dataclass(frozen=True)
class TinyModel:
    """A tiny random model for tests and ``tiny-<name>``: each adapter's own config, plus variants
    that exercise one more quirk of a family a user deploys (``llama3``: Llama 3.x rope scaling;
    ``phi4-mini``: partial rotary, tied head, LongRoPE) without being another architecture."""

    name: str
    arch: str  # the adapter that serves it
    config: Callable[[], object]
    bos: bool = False  # its tokenizer (``tiny_tokenizer(bos=...)``) puts a BOS first, as the family's do


ARCHS: dict[str, ArchAdapter] = {}
TINY_MODELS: dict[str, TinyModel] = {}


def register_tiny(tiny: TinyModel) -> TinyModel:
    if tiny.name in TINY_MODELS:
        raise ValueError(f"tiny model {tiny.name!r} registered twice")
    if tiny.arch not in ARCHS:
        raise ValueError(f"tiny model {tiny.name!r}: architecture {tiny.arch!r} is not registered")
    TINY_MODELS[tiny.name] = tiny
    return tiny


def register_arch(adapter: ArchAdapter, *, tiny_bos: bool = False) -> ArchAdapter:
    """Register ``adapter`` and its own tiny model (``tiny_bos``: see :class:`TinyModel`)."""
    if adapter.name in ARCHS:
        raise ValueError(f"architecture {adapter.name!r} registered twice")
    ARCHS[adapter.name] = adapter
    register_tiny(TinyModel(adapter.name, adapter.name, adapter.tiny_config, tiny_bos))
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
    from otaro.arch.multimodal import wrapped_adapter  # LLaVA model instances: their text model's adapter

    wrapped = wrapped_adapter(model_or_config)
    if wrapped is not None:
        return wrapped
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
