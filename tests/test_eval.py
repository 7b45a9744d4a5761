import math

import pytest
import torch

from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import OtaroError
from otaro.evaluation import report
from otaro.evaluation.data import make_windows, read_text
from otaro.evaluation.metrics import score
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
    from otaro.modules import convert

    checkpoint.save(convert(tiny_model("llama"), "sefp-g64-nearest"), tmp_path / "ck", tokenizer=tiny_tokenizer())
    common = dict(texts=(str(text_file),), bits=(3, 6), seq_len=32, max_windows=2)
    a = run_eval(EvalConfig(str(tmp_path / "ck"), **common), False)["rows"]
    b = run_eval(EvalConfig("tiny-llama", formats=("sefp-g64-nearest",), baseline=False, **common), False)["rows"]
    assert [r["ppl"] for r in a] == [r["ppl"] for r in b]
