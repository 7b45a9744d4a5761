"""Stock clients with their *own* tokenizers on our artifact: onnxruntime-genai's
``og.Tokenizer`` and optimum's ``ORTModelForCausalLM`` with the folder's transformers tokenizer
must encode, generate and decode the same text as our runtime.

The tokenizer here has the decoder chain transformers' GGUF loader writes for a byte-level BPE
(SmolLM2 reaches us that way): genai misread it as SentencePiece and returned id −1 for every
space until the exporter fixed the file (otaro.export.tokenizer_files).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

PROMPT = "The quick brown fox jumps over the lazy dog, and the miller"
NEW = 8
GGUF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


def _gguf_style_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from otaro.arch.tiny import tiny_tokenizer

    spec = json.loads(tiny_tokenizer().backend_tokenizer.to_str())
    spec["decoder"] = GGUF_DECODER
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from otaro import checkpoint
    from otaro.arch.tiny import tiny_model
    from otaro.export.artifact import ExportConfig, export
    from otaro.head import quantize_head
    from otaro.modules import convert

    root = tmp_path_factory.mktemp("stock")
    # the default product path: the head and embedding quantized too (SefpGather in the graph)
    checkpoint.save(quantize_head(convert(tiny_model("llama", init_std=0.15), "sefp-g16-nearest"), 8), root / "ck",
                    tokenizer=_gguf_style_tokenizer())
    export(ExportConfig(root / "ck", root / "art", accuracy_level=1, validate=False))
    return root / "art"


def test_fix_changes_only_the_decoder_and_keeps_transformers_decoding():
    from otaro.export.tokenizer_files import bytelevel_decoder_fix

    spec = json.loads(_gguf_style_tokenizer().backend_tokenizer.to_str())
    fixed = bytelevel_decoder_fix(spec)
    assert fixed["type"] == "ByteLevel"
    assert bytelevel_decoder_fix({**spec, "decoder": fixed}) is None  # idempotent
    # a SentencePiece-style tokenizer (no ByteLevel pre-tokenizer) is left alone
    assert bytelevel_decoder_fix({**spec, "pre_tokenizer": {"type": "Metaspace"}}) is None
    from tokenizers import Tokenizer

    a, b = Tokenizer.from_str(json.dumps(spec)), Tokenizer.from_str(json.dumps({**spec, "decoder": fixed}))
    ids = a.encode(PROMPT + " Ünïcödé, 你好!").ids
    assert a.decode(ids) == b.decode(ids) == PROMPT + " Ünïcödé, 你好!"


def test_exported_tokenizer_is_checksummed_after_the_fix(art):
    from otaro.io import sha256_file

    spec = json.loads((art / "tokenizer.json").read_text())
    assert spec["decoder"]["type"] == "ByteLevel"
    manifest = json.loads((art / "otaro_artifact.json").read_text())
    files = manifest["files"]
    entry = files.get("tokenizer.json") if isinstance(files, dict) else None
    if entry is not None:  # the manifest checksums the file as written, fix included
        assert entry["sha256"] == sha256_file(art / "tokenizer.json")


def test_genai_tokenizer_encodes_generates_and_decodes_like_our_runtime(art):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from otaro.runtime import Runtime

    hf = AutoTokenizer.from_pretrained(str(art))
    want_ids = hf(PROMPT, add_special_tokens=False)["input_ids"]
    model = og.Model(str(art))
    tok = og.Tokenizer(model)
    assert [int(i) for i in tok.encode(PROMPT)] == want_ids  # no −1 ids around spaces
    assert tok.decode(np.array(want_ids, np.int32)) == PROMPT

    rt = Runtime.load(str(art), accuracy_level=1)
    ours = rt.generate(PROMPT, max_new_tokens=NEW)  # at the default precision, as genai runs the file
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=len(want_ids) + NEW, do_sample=False)
    gen = og.Generator(model, p)
    gen.append_tokens(tok.encode(PROMPT).reshape(1, -1))
    toks = []
    while not gen.is_done():
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    assert toks == list(ours.token_ids)
    # (the text of a random model's continuation is often invalid UTF-8, which tokenizers
    # replace differently; the text round trip is checked on the prompt above)


def test_optimum_with_its_tokenizer_generates_our_runtime_text(art):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    from otaro.runtime import Runtime

    tok = AutoTokenizer.from_pretrained(str(art))
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = ORTModelForCausalLM.from_pretrained(str(art), use_cache=True, session_options=opts)
        enc = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
        out = om.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    ours = Runtime.load(str(art), accuracy_level=1).generate(PROMPT, max_new_tokens=NEW)
    assert out[0, enc["input_ids"].shape[1]:].tolist() == list(ours.token_ids)
    assert text == ours.text
