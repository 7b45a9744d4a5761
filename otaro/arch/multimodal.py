"""Multimodal wrappers (LLaVA): the language model's own adapter, re-rooted under the wrapper.

A ``LlavaForConditionalGeneration`` is a vision tower, a projector and an ordinary causal LM
body (``model.language_model``, a Llama/Mistral/Qwen2 model) with the head outside it. Its
decoder layers are the text model's, so the adapter is the text config's adapter with the
layer path and the name prefix moved: ``convert``, ``set_precision`` and the methods then
work on it unchanged, and only the language model's linears are quantized (the vision tower
and the projector stay float).

Adapters resolve for *model instances* only (``get_adapter`` asks after its own table misses;
the layer path depends on how the transformers release nests the text body). The loaders pick
the class to build from the config: ``model_class(config)`` is the wrapper's own class for a
model_type in ``WRAPPERS`` (after checking that its language model is a supported architecture)
and ``AutoModelForCausalLM`` otherwise, so a local LLaVA folder (``otaro.sources``) and a
checkpoint written from one (``otaro.checkpoint``) load as ``LlavaForConditionalGeneration``.
What cannot handle a wrapper refuses it up front with ``refuse_multimodal`` (one OtaroError
line): the multi-task quantization methods, ``--save-format hf``,
``otaro finetune`` and ``otaro export`` (docs/DESIGN.md §7.21).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache


@dataclass(frozen=True)
class Wrapper:
    """Where a multimodal model keeps its parts (dotted paths from the top model)."""

    model_type: str
    model_class: str  # the transformers class the loaders build (``transformers.<model_class>``)
    language: tuple[str, ...]  # candidate paths of the text body (transformers moved it in 4.52)
    projector: tuple[str, ...]
    vision: tuple[str, ...]


WRAPPERS: dict[str, Wrapper] = {
    w.model_type: w
    for w in (
        Wrapper("llava", "LlavaForConditionalGeneration", ("model.language_model", "language_model.model"),
                ("model.multi_modal_projector", "multi_modal_projector"),
                ("model.vision_tower", "vision_tower")),
    )
}


@dataclass(frozen=True)
class Parts:
    """The resolved paths of one model's parts."""

    language: str
    projector: str
    vision: str


def _first(model, paths: tuple[str, ...]) -> str | None:
    for path in paths:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def multimodal_parts(model) -> Parts | None:
    """The parts of a multimodal model instance, or None for a text-only model."""
    config = getattr(model, "config", None)
    wrapper = WRAPPERS.get(getattr(config, "model_type", None))
    if wrapper is None or not hasattr(model, "get_submodule"):
        return None
    found = [_first(model, p) for p in (wrapper.language, wrapper.projector, wrapper.vision)]
    return Parts(*found) if None not in found else None


@lru_cache(maxsize=None)
def _rerooted(name: str, inner, language: str):
    return replace(inner, name=name, model_types=(name,), layers_path=f"{language}.layers", prefix=f"{language}.")


def wrapped_adapter(model_or_config):
    """The re-rooted adapter of a multimodal model instance, or None."""
    from otaro.arch import get_adapter

    if not hasattr(model_or_config, "named_modules"):  # configs and names: see the module doc
        return None
    parts = multimodal_parts(model_or_config)
    if parts is None:
        return None
    config = model_or_config.config
    inner = get_adapter(config.text_config)  # an unsupported text model says so itself
    return _rerooted(config.model_type, inner, parts.language)


def tiny_llava_config(text_arch: str = "llama"):
    """A tiny random LLaVA for tests: a 1-layer CLIP tower on 16x16 images (4 patches of 8x8, so
    4 image tokens per image with the default feature selection that drops CLS), a 2-layer
    projector and the tiny text model of ``text_arch``; the image token is the last id of the
    tiny vocabulary."""
    from transformers import CLIPVisionConfig, LlavaConfig

    from otaro.arch import ARCHS

    text = ARCHS[text_arch].tiny_config()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=32)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


# --------------------------------------------------------------------------------------------
# Loading (otaro.sources, otaro.checkpoint) and what refuses a wrapper
# --------------------------------------------------------------------------------------------


def is_multimodal(model_or_config) -> bool:
    """Whether a model, a config or a ``model_type`` string is one of the ``WRAPPERS``."""
    if isinstance(model_or_config, str):
        return model_or_config in WRAPPERS
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in WRAPPERS


def text_config(config):
    """The language model's config of a wrapper config (its ``text_config``), else ``config``
    itself: where the maximum positions and the vocabulary are."""
    inner = getattr(config, "text_config", None) if is_multimodal(config) else None
    return config if inner is None else inner


def model_class(config):
    """The transformers class that builds ``config``'s model, after checking otaro supports it
    (so an unsupported architecture fails before any weight is read): a wrapper's own class
    (``Wrapper.model_class``) when its language model has an adapter, else AutoModelForCausalLM
    when ``config`` has one. Raises UnsupportedArchitecture (an OtaroError) otherwise."""
    import transformers

    from otaro.arch import get_adapter
    from otaro.errors import UnsupportedArchitecture

    wrapper = WRAPPERS.get(getattr(config, "model_type", None))
    if wrapper is None:
        get_adapter(config)
        return transformers.AutoModelForCausalLM
    text = getattr(config, "text_config", None)
    try:
        get_adapter(text)
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"the language model of this {wrapper.model_type} model: {e}") from None
    return getattr(transformers, wrapper.model_class)


def model_from_config(config, dtype):
    """``model_class(config)`` built from ``config`` (random or, under accelerate's
    ``init_empty_weights``, meta parameters) in ``dtype``; no remote code."""
    cls = model_class(config)
    if hasattr(cls, "from_config"):  # an Auto class
        return cls.from_config(config, dtype=dtype, trust_remote_code=False)
    return cls._from_config(config, dtype=dtype)  # what the Auto classes call on the concrete class


def refuse_multimodal(model_type: str | None, what: str, why: str) -> None:
    """One OtaroError line: ``what`` does not handle a ``model_type`` wrapper (a no-op for a
    text model)."""
    from otaro.errors import OtaroError

    if model_type in WRAPPERS:
        raise OtaroError(f"{what} does not support {model_type} (multimodal) models: {why}")
