"""Tokenizer files that stock clients read the way transformers does.

transformers' GGUF loader gives a byte-level BPE tokenizer (GPT-2 style: ``Ġ`` marks a space)
a SentencePiece-style decoder chain: ``ByteFallback`` → ``Fuse`` → ``Replace("▁", " ")`` →
``ByteLevel``. transformers decodes through it correctly (a byte-level vocabulary has no ``▁``
and no ``<0xNN>`` tokens, so the first three steps do nothing), but onnxruntime-genai's
tokenizer (onnxruntime-extensions) sees the ``▁`` replacement and treats the model as
SentencePiece: ``og.Tokenizer.encode`` returns id −1 for every space and decoding garbles the
text. SmolLM2, the benchmark model, reaches us through exactly this loader.

For such a file the decoder is set to the plain ``ByteLevel`` decoder the original GPT-2-style
tokenizer has, which decodes every id sequence to the same text (checked in the tests against
transformers on the fixed file) and lets genai encode and decode it.
"""

from __future__ import annotations

import json
from pathlib import Path

from otaro.io import write_json

_SPM_STEPS = {"ByteFallback", "Fuse", "Replace", "Strip"}


def _steps(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    return list(decoder.get("decoders", [])) if decoder.get("type") == "Sequence" else [decoder]


def bytelevel_decoder_fix(tok: dict) -> dict | None:
    """The decoder a byte-level BPE ``tokenizer.json`` should have, or None if it is fine."""
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    pre_types = {p.get("type") for p in _steps_pre(pre)}
    if model.get("type") != "BPE" or "ByteLevel" not in pre_types:
        return None
    steps = _steps(tok.get("decoder"))
    types = [s.get("type") for s in steps]
    if "ByteLevel" not in types or not (set(types) - {"ByteLevel"}) or not set(types) - {"ByteLevel"} <= _SPM_STEPS:
        return None  # already plain, or a chain we do not recognise: leave it as its author wrote it
    level = next(s for s in steps if s.get("type") == "ByteLevel")
    return {"type": "ByteLevel", "add_prefix_space": level.get("add_prefix_space", True),
            "trim_offsets": level.get("trim_offsets", True), "use_regex": level.get("use_regex", True)}


def _steps_pre(pre: dict) -> list[dict]:
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


# What the exported decoder graphs take from a tokenizer. A tokenizer without
# ``model_input_names`` (a plain PreTrainedTokenizerFast) also returns ``token_type_ids``, which
# optimum's ``generate(**tokenizer(text))`` then refuses as an unused model input.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def _fix_model_inputs(folder: Path) -> bool:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(cfg, dict) or cfg.get("model_input_names") == MODEL_INPUT_NAMES:
        return False
    cfg["model_input_names"] = MODEL_INPUT_NAMES
    write_json(path, cfg)
    return True


def fix_tokenizer_folder(folder: str | Path) -> bool:
    """Make the tokenizer files in ``folder`` read right by stock clients (atomic rewrites):
    the byte-level decoder fix, and the inputs our graphs take. Returns whether a file changed."""
    changed = _fix_model_inputs(Path(folder))
    return _fix_decoder(Path(folder)) or changed


def _fix_decoder(folder: Path) -> bool:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False  # not ours to judge here: the loaders report a corrupt file
    fixed = bytelevel_decoder_fix(tok)
    if fixed is None:
        return False
    tok["decoder"] = fixed
    write_json(path, tok)
    return True
