import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import OtaroError
from otaro.evaluation import reference as refs
from otaro.evaluation import report
from otaro.evaluation.data import make_windows, read_text
from otaro.evaluation.metrics import fidelity, score
from otaro.evaluation.run import EvalConfig, run_eval


class _Uniform(torch.nn.Module):
    """A model that predicts every token with equal probability: perplexity must equal vocab."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(text_file):
    tok = tiny_tokenizer()
    w = make_windows(tok, text_file.read_text(), 32, None)
    s = score(_Uniform(len(tok)), w)
    assert s.ppl == pytest.approx(len(tok), rel=1e-5)
    assert s.tokens == w.tokens.numel() - len(w.tokens)
    # bits per byte = log2(vocab) per token spread over the bytes those tokens cover
    assert s.bpb == pytest.approx(math.log2(len(tok)) * s.tokens / s.bytes, rel=1e-5)


def test_windows_are_capped_evenly_and_deterministically(text_file):
    tok = tiny_tokenizer()
    text = text_file.read_text()
    full = make_windows(tok, text, 16, None)
    capped = make_windows(tok, text, 16, 3)
    assert len(capped.tokens) == 3
    assert torch.equal(capped.tokens[0], full.tokens[0]) and torch.equal(capped.tokens[-1], full.tokens[-1])
    assert torch.equal(capped.tokens, make_windows(tok, text, 16, 3).tokens)


def test_window_errors(text_file):
    tok = tiny_tokenizer()
    with pytest.raises(OtaroError, match="fewer than one window"):
        make_windows(tok, "short text", 512, None)
    with pytest.raises(OtaroError, match="larger than the model allows"):
        make_windows(tok, text_file.read_text(), 512, None, max_positions=256)


def test_read_text_errors(tmp_path):
    with pytest.raises(OtaroError, match="not a corpus"):
        read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(OtaroError, match="empty"):
        read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(OtaroError, match="UTF-8"):
        read_text(str(tmp_path / "bin.txt"))


def test_run_eval_rows_report_and_plot(tmp_path, text_file):
    cfg = EvalConfig("tiny-llama", (str(text_file),), bits=(2, 4, 8), formats=("sefp-g64-trunc", "int4-g64-asym"),
                     seq_len=32, max_windows=3)
    result = run_eval(cfg, show_progress=False)
    rows = {(r["label"], r["bits"]): r for r in result["rows"]}
    assert set(rows) == {("fp32", None), ("sefp-g64-trunc", 2), ("sefp-g64-trunc", 4), ("sefp-g64-trunc", 8),
                         ("int-g64-asym", 4)}
    assert rows[("sefp-g64-trunc", 4)]["bits_per_weight"] == 4.125
    # the quantized model at 8 bits is close to fp32 (random tiny model: logits barely move)
    assert rows[("sefp-g64-trunc", 8)]["ppl"] == pytest.approx(rows[("fp32", None)]["ppl"], rel=0.01)
    # on-the-fly quantization leaves the fp32 model untouched: a second run gives the same fp32 row
    again = run_eval(EvalConfig("tiny-llama", (str(text_file),), formats=(), seq_len=32, max_windows=3), False)
    assert again["rows"][0]["ppl"] == rows[("fp32", None)]["ppl"]
    out = report.save(result, tmp_path / "ev", "t")
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.table_text(result["rows"])
    assert "sefp-g64-trunc" in text and "int-g64-asym" in text


def test_checkpoint_eval_matches_on_the_fly_quantization(tmp_path, text_file):
    from otaro import checkpoint
    from otaro.head import quantize_head
    from otaro.modules import convert

    # `otaro quantize` stores an 8-bit SEFP head by default; on-the-fly eval does the same
    checkpoint.save(quantize_head(convert(tiny_model("llama"), "sefp-g64-nearest"), 8), tmp_path / "ck",
                    tokenizer=tiny_tokenizer())
    checkpoint.save(convert(tiny_model("llama"), "sefp-g64-nearest"), tmp_path / "ck-float", tokenizer=tiny_tokenizer())
    common = dict(texts=(str(text_file),), bits=(3, 6), seq_len=32, max_windows=2)
    a = run_eval(EvalConfig(str(tmp_path / "ck"), **common), False)["rows"]
    b = run_eval(EvalConfig("tiny-llama", formats=("sefp-g64-nearest",), baseline=False, **common), False)["rows"]
    assert [r["ppl"] for r in a] == [r["ppl"] for r in b]
    a = run_eval(EvalConfig(str(tmp_path / "ck-float"), **common), False)["rows"]
    b = run_eval(EvalConfig("tiny-llama", formats=("sefp-g64-nearest",), baseline=False, head_bits=None, **common),
                 False)["rows"]
    assert [r["ppl"] for r in a] == [r["ppl"] for r in b]


# --- fidelity to a reference: KLD, its 99th percentile, top-1 agreement -----------------------


def test_fidelity_matches_a_hand_computation():
    ref_logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    q_logits = np.array([[1.0, 2.0, 0.0], [0.1, 0.4, 2.5]])

    def log_softmax(x):
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    expected = (np.exp(lp) * (lp - lq)).sum(-1)
    kl, top1 = fidelity(torch.tensor(lp, dtype=torch.float32), torch.tensor(q_logits, dtype=torch.float32))
    assert kl.dtype == torch.float64 and kl.shape == (2,)
    # the inputs are float32 log-probs (~1e-7 absolute each); a small KL is a difference of such
    # terms, so compare absolutely at a few float32 ulps of 1
    assert kl.numpy() == pytest.approx(expected, abs=5e-7)
    assert top1.tolist() == [False, True]  # argmax 0 vs 1, then 2 vs 2
    # a token the reference rules out (p = 0) adds nothing, and gives no NaN
    lp0 = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    kl0, _ = fidelity(lp0, torch.tensor([[1.0, 0.0, 0.0]]))
    assert kl0.item() == pytest.approx(-math.log(math.e / (math.e + 2)))


def test_reference_against_itself_is_exactly_zero(text_file):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    w = make_windows(tok, text_file.read_text(), 32, 3)
    cache, (ref_score,) = refs.compute(model, [w], batch_size=2)
    with cache:
        s = score(model, w, batch_size=2, reference=cache[0])
    assert s.kld == 0.0 and s.kld_p99 == 0.0 and s.top1 == 1.0
    assert s.nll == ref_score.nll
    assert score(model, w).kld is None  # no reference, no metric


def test_kld_rows_in_run_eval_and_report(tmp_path, text_file):
    cfg = EvalConfig("tiny-llama", (str(text_file),), bits=(2, 8), formats=("sefp-g64-trunc",), seq_len=32,
                     max_windows=2)
    result = run_eval(cfg, show_progress=False)
    rows = {(r["label"], r["bits"]): r for r in result["rows"]}
    assert set(rows[("fp32", None)]) == {"dataset", "label", "format", "bits", "bits_per_weight", "ppl", "bpb",
                                         "tokens", "bytes", "kld", "kld_p99", "top1", "bos"}
    assert rows[("fp32", None)]["kld"] == 0.0 and rows[("fp32", None)]["top1"] == 1.0
    lo, hi = rows[("sefp-g64-trunc", 2)], rows[("sefp-g64-trunc", 8)]
    assert 0 < hi["kld"] < lo["kld"]
    assert hi["kld"] <= hi["kld_p99"] and 0 <= lo["top1"] <= hi["top1"] <= 1
    assert result["reference"]["origin"] == "self" and result["reference"]["note"] is None
    assert result["reference"]["ppl"]["sample"] == rows[("fp32", None)]["ppl"]
    text = report.table_text(result["rows"], width=200)
    assert "KLD" in text and "p99" in text and "top-1%" in text
    assert report.save(result, tmp_path / "ev")["png"].stat().st_size > 1000
    # without a reference the columns go away and the rows carry null
    none = run_eval(dataclasses.replace(cfg, use_reference=False), show_progress=False)
    assert all(r["kld"] is None and r["kld_p99"] is None and r["top1"] is None for r in none["rows"])
    assert "KLD" not in report.table_text(none["rows"])
    assert [r["ppl"] for r in none["rows"]] == [r["ppl"] for r in result["rows"]]


def _ckpt(tmp_path, source="tiny-llama"):
    from otaro.quantize import QuantizeConfig, quantize

    return quantize(QuantizeConfig(model=source, output=str(tmp_path / "ck"), format="sefp-g64-trunc"))


def _count_reference_forwards(monkeypatch, spec):
    """Wrap load_source so that the model loaded for ``spec`` counts its forward calls."""
    import otaro.sources

    calls = []
    real = otaro.sources.load_source

    def load(s, *a, **k):
        src = real(s, *a, **k)
        if str(s) == spec:
            src.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
        return src

    monkeypatch.setattr(otaro.sources, "load_source", load)
    return calls


@pytest.mark.parametrize("memmap", [False, True])
def test_reference_logprobs_are_computed_once_for_all_bit_widths(tmp_path, text_file, monkeypatch, memmap):
    import tempfile

    ck = _ckpt(tmp_path)
    calls = _count_reference_forwards(monkeypatch, "tiny-llama")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    if memmap:
        monkeypatch.setattr(refs, "MEMMAP_BYTES", 0)  # force the on-disk cache
    made = []
    real_cache = refs.LogprobCache

    def cache(*a, **k):
        c = real_cache(*a, **k)
        made.append(c.dir)
        return c

    monkeypatch.setattr(refs, "LogprobCache", cache)
    result = run_eval(EvalConfig(str(ck), (str(text_file), str(text_file)), bits=(2, 4, 8), seq_len=32,
                                 max_windows=3), show_progress=False)
    assert len(calls) == 2 * 3  # one forward per window of each text, not per bit-width
    assert result["reference"] == {"model": "tiny-llama", "origin": "manifest", "note": None,
                                   "ppl": result["reference"]["ppl"]}
    assert [r["bits"] for r in result["rows"]] == [2, 2, 4, 4, 8, 8]
    assert all(r["kld"] > 0 and 0 <= r["top1"] <= 1 for r in result["rows"])
    assert (made[0] is not None) == memmap
    assert list(temp.iterdir()) == []  # the memmap folder is gone
    # the same numbers as quantizing on the fly against the float model
    fly = run_eval(EvalConfig("tiny-llama", (str(text_file),), bits=(2, 4, 8), formats=("sefp-g64-trunc",),
                              baseline=False, seq_len=32, max_windows=3), show_progress=False)
    assert [r["kld"] for r in fly["rows"]] == [r["kld"] for r in result["rows"][::2]]


@pytest.fixture
def other_vocab(tmp_path):
    """A tiny llama saved as an HF folder with 400 tokens in its vocabulary instead of 320."""
    from transformers import AutoModelForCausalLM

    from otaro.arch import ARCHS

    config = ARCHS["llama"].tiny_config()
    config.vocab_size = 400
    path = tmp_path / "hf400"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _no_scoring(monkeypatch):
    import otaro.evaluation.metrics

    def fail(*a, **k):
        raise AssertionError("a window was scored before the reference was checked")

    monkeypatch.setattr(otaro.evaluation.metrics, "score", fail)


def test_reference_with_another_vocabulary_fails_before_any_evaluation(tmp_path, text_file, other_vocab, monkeypatch):
    ck = _ckpt(tmp_path)
    _no_scoring(monkeypatch)
    with pytest.raises(refs.ReferenceMismatch, match="reference model .*hf400 has vocabulary 400, the checkpoint has 320"):
        run_eval(EvalConfig(str(ck), (str(text_file),), seq_len=32, reference=str(other_vocab)), False)
    # the loaded-model check, for references whose config cannot be peeked at (here: with the peek off)
    monkeypatch.setattr(refs, "_peek_vocab", lambda spec: None)
    with pytest.raises(refs.ReferenceMismatch, match="vocabulary 400, the model has 320"):
        run_eval(EvalConfig("tiny-llama", (str(text_file),), seq_len=32, formats=("sefp-g64-trunc",),
                            reference=str(other_vocab)), False)


def test_reference_with_another_tokenizer_fails_before_any_evaluation(tmp_path, text_file, monkeypatch):
    ref = tmp_path / "ref"
    tiny_model("llama").save_pretrained(ref)
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(ref)
    _no_scoring(monkeypatch)
    with pytest.raises(refs.ReferenceMismatch, match="tokenizer has 321 tokens, the model's has 320"):
        run_eval(EvalConfig("tiny-llama", (str(text_file),), seq_len=32, reference=str(ref)), False)


def test_checkpoint_without_a_loadable_source_skips_fidelity_with_a_note(tmp_path, text_file):
    from otaro import checkpoint
    from otaro.modules import convert

    checkpoint.save(convert(tiny_model("llama"), "sefp-g64-trunc"), tmp_path / "ck", tokenizer=tiny_tokenizer())
    r = run_eval(EvalConfig(str(tmp_path / "ck"), (str(text_file),), bits=(4,), seq_len=32, max_windows=1), False)
    assert "records no source model" in r["reference"]["note"] and r["rows"][0]["kld"] is None
    with pytest.raises(OtaroError, match="contradict"):
        EvalConfig("tiny-llama", (str(text_file),), reference="tiny-llama", use_reference=False)


def _cli(*args):
    from otaro.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_reference_and_no_reference(tmp_path, text_file):
    hf = tmp_path / "hf"
    tiny_model("qwen2").save_pretrained(hf)
    tiny_tokenizer().save_pretrained(hf)
    ck = tmp_path / "ck"
    assert _cli("quantize", hf, "-o", ck, "--format", "sefp-g64-trunc").exit_code == 0
    common = ("--text", text_file, "--bits", "3,8", "--seq-len", 32, "--max-windows", 2)

    res = _cli("eval", ck, *common, "--reference", hf, "-o", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "KLD" in res.output and "top-1%" in res.output and "note:" not in res.output
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert a["reference"]["origin"] == "option" and all(r["kld"] > 0 for r in a["rows"])

    res = _cli("eval", ck, *common, "-o", tmp_path / "b")  # default: the source recorded in the manifest
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert b["reference"]["origin"] == "manifest"
    assert [r["kld"] for r in b["rows"]] == [r["kld"] for r in a["rows"]]

    res = _cli("eval", ck, *common, "--no-reference", "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert "KLD" not in res.output and "note:" not in res.output
    c = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert all(r["kld"] is None and r["kld_p99"] is None and r["top1"] is None for r in c["rows"])

    import shutil

    shutil.rmtree(hf)  # the source is gone: eval still runs, with a one-line note
    res = _cli("eval", ck, *common, "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    assert "note: reference" in res.output and "KLD/top-1 skipped" in res.output

    res = _cli("eval", ck, *common, "--reference", tmp_path / "missing")
    assert res.exit_code != 0 and "no such folder" in res.output and "Traceback" not in res.output
    res = _cli("eval", ck, *common, "--reference", "tiny-llama", "--no-reference")
    assert res.exit_code != 0 and "contradict" in res.output


def test_eval_help_explains_the_metrics():
    res = _cli("eval", "--help")
    assert res.exit_code == 0
    assert "KL(P_ref || P_quant)" in res.output and "top-1" in res.output and "--no-reference" in res.output
