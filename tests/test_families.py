"""The full path on the tiny models of the families users deploy on devices today.

For each of Gemma 3 (sliding-window layers, window 4: far shorter than every sequence here),
Qwen3, Llama 3.x rope scaling, SmolLM3 (NoPE layers) and Phi-4-mini (partial rotary, tied
head, LongRoPE switching at 32 tokens): quantize (RTN, multi-bit GPTQ), evaluate, fine-tune a
couple of steps, export to ONNX (validated against torch), then run the torch-free runtime and
compare it with torch *beyond* the sliding window and the LongRoPE switch point: logits of
every KV-cache decode step, greedy tokens, a left-padded batch, ``otaro run``.
"""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from otaro import checkpoint
from otaro.arch import TINY_MODELS
from otaro.arch.families import LONGROPE_ORIGINAL
from otaro.arch.tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer
from otaro.export import validate
from otaro.export.artifact import ExportConfig, export

FAMILIES = ("gemma3", "qwen3", "llama3", "smollm3", "phi4-mini")
# The six tiny models test_export.py has covered since the start; every later one is here.
ORIGINAL_SIX = {"llama", "qwen2", "mistral", "gemma", "phi3", "gpt_neox"}
SEQ = 40  # > the Gemma 3 window (4) and the tiny Phi-4-mini's LongRoPE switch (32)
PROMPT_LEN, NEW = 28, 10  # the greedy continuation crosses the switch at 32


def test_every_tiny_model_added_since_the_original_six_is_covered_here():
    assert set(TINY_MODELS) - ORIGINAL_SIX == set(FAMILIES)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # On 2 shared cores, tiny matmuls on two OpenMP threads spend their time waiting for each
    # other (a 16-token forward: 0.23 s on 2 threads, 0.009 s on 1).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(SAMPLE_TEXT * 12, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory, text):
    """family -> its folders: the HF model, RTN int4 and multi-bit GPTQ checkpoints (made once)."""
    from otaro.quantize import QuantizeConfig, quantize

    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"family-{family}")
            hf = root / "hf"
            tiny_model(family, init_std=0.15).save_pretrained(hf)
            tiny_tokenizer(TINY_MODELS[family].bos).save_pretrained(hf)
            rtn = quantize(QuantizeConfig(model=str(hf), output=str(root / "rtn4"), format="int4-g16-asym"))
            gptq = quantize(QuantizeConfig(model=str(hf), output=str(root / "gptq"), method="gptq",
                                           format="sefp-g16-nearest", bits="3:1,8:1", calib=(str(text),),
                                           calib_samples=4, calib_len=SEQ))
            cache[family] = {"root": root, "hf": hf, "rtn": rtn, "gptq": gptq}
        return cache[family]

    return get


@pytest.fixture(scope="module")
def artifact(built):
    cache = {}

    def get(family):
        if family not in cache:
            d = built(family)
            art = d["root"] / "art"
            manifest = export(ExportConfig(d["gptq"], art, variants=(f"rtn4={d['rtn']}",), accuracy_level=1,
                                           validate_tokens=6, threads=1))
            cache[family] = (art, manifest)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_and_eval(built, text, family):
    from otaro.evaluation.run import EvalConfig, run_eval

    d = built(family)
    assert checkpoint.read_manifest(d["rtn"])["method"]["name"] == "rtn"
    assert checkpoint.read_manifest(d["gptq"])["method"]["name"] == "gptq"
    result = run_eval(EvalConfig(str(d["gptq"]), (str(text),), bits=(3, 8), seq_len=SEQ, max_windows=2),
                      show_progress=False)
    assert result["reference"]["origin"] == "manifest"  # the HF folder it was quantized from
    assert result["bos"] is TINY_MODELS[family].bos
    rows = {r["bits"]: r for r in result["rows"]}
    assert all(math.isfinite(r["ppl"]) and r["tokens"] == 2 * (SEQ - 1) for r in rows.values())
    assert 0 < rows[8]["kld"] < rows[3]["kld"]  # GPTQ tuned for both; 8 bits is closer to the source


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_a_few_steps(built, text, tmp_path, family):
    from otaro.training.config import FinetuneConfig
    from otaro.training.trainer import finetune

    d = built(family)
    out = finetune(FinetuneConfig(model=str(d["hf"]), data=(str(text),), output=str(tmp_path / "tuned"), steps=2,
                                  seq_len=SEQ, batch_size=2, bits=(3, 8), lr=1e-3, warmup_steps=0,
                                  heldout_fraction=0.1, eval_every=2, eval_batches=1, save_every=2),
                   show_progress=False)
    model = checkpoint.load(out)
    x = torch.tensor([list(range(3, 3 + SEQ))])
    for b in (3, 8):
        model.set_precision(b)
        assert torch.isfinite(model(x).logits).all()
    # it learned something: the tuned weights differ from the source's
    src = tiny_model(family, init_std=0.15)
    assert not torch.equal(src.get_input_embeddings().weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_validated_against_torch(artifact, family):
    _, m = artifact(family)
    res = m["validation"]["results"]
    assert [(r["model"], r["bits"]) for r in res] == [("main", b) for b in range(2, 9)] + [("rtn4", 4)]
    assert all(r["passed"] and r["greedy_equal"] for r in res)
    assert max(r["max_abs_diff"] for r in res) < 1e-4
    assert m["architecture"]["arch"] == TINY_MODELS[family].arch


def _prefix_logits(model, ids: list[int]) -> np.ndarray:
    """Last-position logits of every prefix ids[:t+1]: what a KV-cache step must reproduce
    (the plain definition; a LongRoPE model switches factors by the prefix's own length)."""
    with torch.no_grad():
        return np.stack([model(torch.tensor([ids[: t + 1]])).logits[0, -1].numpy() for t in range(len(ids))])


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_matches_torch_beyond_the_window(artifact, built, family):
    from otaro.runtime import Runtime
    from otaro.runtime.decoder import Batch

    art, _ = artifact(family)
    rt = Runtime.load(art, accuracy_level=1, threads=1)
    model = checkpoint.load(built(family)["gptq"])
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(1, 320, SEQ)]
    for bits in (3, 8):
        rt.set_precision(bits)
        model.set_precision(bits)
        want = _prefix_logits(model, ids)
        # (a) every KV-cache step, from a 3-token prefill to 40 tokens
        batch = Batch(rt.decoder, [ids[:3]], pad_id=0)
        got = [batch.prefill()[0]] + [batch.step(np.array([t]))[0] for t in ids[3:]]
        diff = np.abs(np.stack(got) - want[2:]).max(axis=-1)
        assert diff.max() < 1e-3 * max(1.0, float(np.abs(want).max())), (bits, diff.round(4).tolist())
        # (b) greedy tokens of the runtime == torch's (no cache: the plain definition)
        prompt = ids[:PROMPT_LEN]
        _, torch_tokens = validate.torch_reference(model, prompt, NEW)
        gen = rt.generate(prompt, max_new_tokens=NEW)
        assert list(gen.token_ids) == torch_tokens, bits
    # (c) a left-padded batch gives each prompt what it gets alone
    short = ids[:PROMPT_LEN - 7]
    alone = [rt.generate(p, max_new_tokens=NEW).token_ids for p in (prompt, short)]
    assert [g.token_ids for g in rt.generate([prompt, short], max_new_tokens=NEW)] == alone
    # a text prompt gets the BOS exactly when the family's tokenizer adds one
    assert (rt.encode("The weather")[0] == 0) is TINY_MODELS[family].bos


@pytest.mark.parametrize("family", ["gemma3", "phi4-mini"])
def test_the_quirk_is_real_so_the_comparisons_above_mean_something(built, family):
    """Without the sliding window (Gemma 3) or without the LongRoPE switch (Phi-4-mini), torch's
    own logits change beyond the window / switch point: the runtime matched the real thing."""
    model = tiny_model(family, init_std=0.15)
    ids = list(range(5, 5 + SEQ))
    base = _prefix_logits(model, ids)
    cfg = model.config
    if family == "gemma3":
        cfg.sliding_window = 10 * SEQ  # every layer sees everything
        first_affected = 4  # position 4 is the first to lose a key under a window of 4
    else:
        cfg.original_max_position_embeddings = 10 * SEQ  # never switch to the long factors
        first_affected = LONGROPE_ORIGINAL
    other = _prefix_logits(model, ids)
    diff = np.abs(other - base).max(axis=-1)
    assert diff[:first_affected].max() < 1e-5 and diff[first_affected:].min() > 1e-3


def test_otaro_run_generates_on_a_sliding_window_family(artifact):
    from otaro.cli import cli

    art, _ = artifact("gemma3")
    r = CliRunner().invoke(cli, ["run", str(art), "--bits", "4", "--prompt", "The weather", "--max-new-tokens", "12",
                                 "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "4" in r.output


def test_longrope_metadata_reaches_the_runtime_decoder(artifact):
    import onnx

    from otaro.arch.rope import RESET_KEY
    from otaro.runtime import decoder

    assert decoder.RESET_KEY == RESET_KEY
    art, _ = artifact("phi4-mini")
    meta = {p.key: p.value for p in onnx.load(str(art / "model.onnx"), load_external_data=False).metadata_props}
    assert meta[RESET_KEY] == str(LONGROPE_ORIGINAL)
    vmeta = {p.key: p.value for p in onnx.load(str(art / "variants/rtn4/model.onnx"),
                                               load_external_data=False).metadata_props}
    assert vmeta[RESET_KEY] == str(LONGROPE_ORIGINAL)
    assert json.loads((art / "config.json").read_text())["rope_scaling"]["type"] == "longrope"
