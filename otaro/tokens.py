"""What a model expects around its text, read from its tokenizer's own settings.

Evaluation windows, fine-tuning blocks and GPTQ calibration windows tokenize text *without*
special tokens (so a chat model's special tokens are never scored or learned as text), then put
a BOS first when the model was trained with one at every sequence start (Gemma, Llama): such a
model conditions everything on it, and scoring it without would measure the wrong model (a
Gemma-style model: perplexity 94.7 without ``<bos>``, 38.5 with it, same windows and targets).
"""

from __future__ import annotations


def leading_bos(tokenizer) -> int | None:
    """The BOS id ``tokenizer`` puts before every text when asked for special tokens, or None.

    Decided by what the tokenizer does, not by its class or a flag name (``add_bos_token`` on
    Llama/Gemma tokenizers, a ``TemplateProcessing`` post-processor on Llama 3's): SmolLM2
    declares a BOS (a chat token) but never adds it, so it gets none here."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None
