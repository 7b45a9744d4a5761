"""Multimodal wrappers (LLaVA): the language model's own adapter, re-rooted under the wrapper.

A ``LlavaForConditionalGeneration`` is a vision tower, a projector and an ordinary causal LM
body (``model.language_model``, a Llama/Mistral/Qwen2 model) with the head outside it. Its
decoder layers are the text model's, so the adapter is the text config's adapter with the
layer path and the name prefix moved: ``convert``, ``set_precision`` and the methods then
work on it unchanged, and only the language model's linears are quantized (the vision tower
and the projector stay float).

Only *model instances* resolve here (``get_adapter`` asks after its own table misses): a
LLaVA folder or config still gets "not supported" when otaro is asked to load one, because the
loaders (``otaro.sources``, ``otaro.checkpoint``) build causal LMs only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache


@dataclass(frozen=True)
class Wrapper:
    """Where a multimodal model keeps its parts (dotted paths from the top model)."""

    model_type: str
    language: tuple[str, ...]  # candidate paths of the text body (transformers moved it in 4.52)
    projector: tuple[str, ...]
    vision: tuple[str, ...]


WRAPPERS: dict[str, Wrapper] = {
    w.model_type: w
    for w in (
        Wrapper("llava", ("model.language_model", "language_model.model"),
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
