"""Tiny random models and a tiny tokenizer, built in memory (tests and the offline quick demo).

No download: the model comes from the adapter's config, the tokenizer is a byte-level BPE
trained in a few milliseconds on a fixed English paragraph, so runs are deterministic.
"""

from __future__ import annotations

import functools

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model that is tuned once can run at every "
    "precision: eight bits for writing, three or four bits for reading. Shared exponents keep one "
    "stored copy; shorter mantissas are simply cut from it. The weather was fine, and the river "
    "ran quietly past the mill where the old miller counted his sacks of grain, one by one, "
    "until the evening bell rang over the fields and the children came home for supper.\n"
)


def tiny_model(arch: str = "llama", seed: int = 0, init_std: float | None = None):
    """A 2-layer random model of a registered tiny model (an architecture or a variant such as
    ``llama3``; a ``model_type`` string picks that architecture's own), in eval mode, fp32.

    ``init_std`` re-draws every matrix from N(0, init_std²): with the configs' default (0.02)
    the embeddings dominate and greedy decoding just repeats a token, which makes token-level
    comparisons (export validation) vacuous; 0.15 gives varied continuations. An embedding that
    scales its output (Gemma 3: by sqrt(hidden), ``embed_scale``) is drawn that much smaller, or
    it would dominate again (every position would predict its own token through the tied head)."""
    import torch
    from transformers import AutoModelForCausalLM

    from otaro.arch import TINY_MODELS, get_adapter

    tiny = TINY_MODELS.get(arch) or TINY_MODELS[get_adapter(arch).name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny.config(), dtype=torch.float32)
    if init_std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
            emb = model.get_input_embeddings()
            scale = getattr(emb, "embed_scale", None)
            if scale is not None:
                emb.weight.div_(float(scale))
    return model.eval()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(bos: bool = False):
    """A 320-token byte-level BPE tokenizer (fits every tiny model's vocabulary).

    ``bos=True``: it puts ``<|endoftext|>`` (id 0, also EOS and pad, as GPT-2's) before every
    text encoded with special tokens, as Gemma's and Llama's tokenizers put their BOS; the
    vocabulary is full, so the BOS cannot be a token of its own."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
