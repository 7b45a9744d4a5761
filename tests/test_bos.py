"""A model trained with a BOS at every sequence start reads one in evaluation, fine-tuning and
GPTQ calibration; a model whose tokenizer adds none (SmolLM2: its BOS is a chat token) is
unchanged. The BOS is never scored: the same windows, the same targets, the same counts."""

import pytest
import torch
from tokenizers import Tokenizer
from torch.nn import functional as F
from transformers import GemmaTokenizerFast, LlamaTokenizerFast, PreTrainedTokenizerFast

from otaro.arch.tiny import SAMPLE_TEXT, _tokenizer_json, tiny_model, tiny_tokenizer
from otaro.errors import OtaroError
from otaro.evaluation import reference as refs
from otaro.evaluation.data import make_windows
from otaro.evaluation.metrics import score
from otaro.tokens import leading_bos

TEXT = SAMPLE_TEXT * 12
BOS = 0  # the tiny tokenizer's <|endoftext|>


@pytest.mark.parametrize("cls", [LlamaTokenizerFast, GemmaTokenizerFast])
def test_leading_bos_follows_what_the_tokenizer_does(cls):
    kw = dict(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<|endoftext|>",
              eos_token="<|endoftext|>")
    assert leading_bos(cls(add_bos_token=True, **kw)) == BOS
    assert leading_bos(cls(add_bos_token=False, **kw)) is None
    # a declared BOS that is never added (SmolLM2's <|im_start|>): none
    assert tiny_tokenizer().bos_token_id == BOS and leading_bos(tiny_tokenizer()) is None
    assert leading_bos(tiny_tokenizer(bos=True)) == BOS
    assert leading_bos(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()))) is None


def test_windows_get_the_bos_with_the_same_windows_targets_and_count():
    plain = make_windows(tiny_tokenizer(), TEXT, 32, 5)
    with_bos = make_windows(tiny_tokenizer(bos=True), TEXT, 32, 5)
    assert plain.bos_id is None and with_bos.bos_id == BOS
    assert torch.equal(plain.tokens, with_bos.tokens)
    assert plain.predicted_bytes == with_bos.predicted_bytes and plain.total_tokens == with_bos.total_tokens
    assert torch.equal(plain.model_inputs(), plain.tokens)
    inputs = with_bos.model_inputs(1, 3)
    assert inputs.shape == (2, 33) and (inputs[:, 0] == BOS).all() and torch.equal(inputs[:, 1:], plain.tokens[1:3])


def test_the_bos_reaches_the_model_and_is_not_scored():
    model = tiny_model("llama", init_std=0.15)
    w = make_windows(tiny_tokenizer(bos=True), TEXT, 32, 3)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    s = score(model, w, batch_size=2)
    hook.remove()
    assert all((x[:, 0] == BOS).all() and x.shape[1] == 33 for x in seen)
    with torch.no_grad():  # by hand: [BOS] + window in, tokens 1..31 of the window scored
        logits = model(w.model_inputs()).logits[:, 1:-1]
    want = F.cross_entropy(logits.reshape(-1, 320), w.tokens[:, 1:].reshape(-1), reduction="sum")
    assert s.tokens == 3 * 31 and s.nll == pytest.approx(float(want), rel=1e-5)
    plain = score(model, make_windows(tiny_tokenizer(), TEXT, 32, 3), batch_size=2)
    assert plain.tokens == s.tokens and plain.bytes == s.bytes and abs(plain.ppl - s.ppl) > 1e-3 * plain.ppl


def test_reference_log_probs_use_the_same_bos_windows():
    model = tiny_model("llama", init_std=0.15)
    w = make_windows(tiny_tokenizer(bos=True), TEXT, 32, 3)
    cache, (ref_score,) = refs.compute(model, [w], batch_size=2)
    with cache:
        assert cache[0].shape == (3, 31, 320)
        s = score(model, w, batch_size=1, reference=cache[0])
    assert s.kld == 0.0 and s.top1 == 1.0 and s.nll == pytest.approx(ref_score.nll, rel=1e-6)


@pytest.mark.parametrize("bos", [False, True])
def test_eval_reports_the_bos_and_leaves_it_room_in_a_default_window(tmp_path, bos):
    from otaro.evaluation import report
    from otaro.evaluation.run import EvalConfig, run_eval

    hf = tmp_path / "hf"
    tiny_model("llama", init_std=0.15).save_pretrained(hf)  # max_position_embeddings 256
    tiny_tokenizer(bos=bos).save_pretrained(hf)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    result = run_eval(EvalConfig(str(hf), (str(text),), max_windows=1, use_reference=False), show_progress=False)
    assert result["bos"] is bos and result["windows"]["t"]["bos"] is bos
    assert result["config"]["seq_len"] == (255 if bos else 256)  # the BOS takes one position
    line = "read after the model's BOS" if bos else "without a BOS"
    assert line in report.table_text(result["rows"], "title")
    if bos:
        with pytest.raises(OtaroError, match="256 plus its BOS is larger than the model allows"):
            run_eval(EvalConfig(str(hf), (str(text),), seq_len=256, use_reference=False), show_progress=False)


def test_packing_puts_the_bos_first_in_every_block():
    from otaro.training.data import pack, plain, token_stream

    examples = [plain(p, f"x:{i}") for i, p in enumerate(SAMPLE_TEXT.split(". "))] * 4
    no = pack(tiny_tokenizer(), examples, 16, 0)
    yes = pack(tiny_tokenizer(bos=True), examples, 16, 0)
    assert (yes.input_ids[:, 0] == BOS).all() and torch.equal(yes.labels, yes.input_ids)
    # the same stream; with the BOS each block carries 15 of its tokens instead of 16
    ids, _ = token_stream(tiny_tokenizer(), examples, 0)
    stream = torch.tensor(list(ids))
    assert len(no) == len(ids) // 16 and len(yes) == len(ids) // 15
    assert torch.equal(no.input_ids.reshape(-1), stream[: len(no) * 16])
    assert torch.equal(yes.input_ids[:, 1:].reshape(-1), stream[: len(yes) * 15])


def test_build_splits_records_the_bos(tmp_path):
    from otaro.training.data import build_splits

    p = tmp_path / "d.txt"
    p.write_text((SAMPLE_TEXT + "\n\n") * 10, encoding="utf-8")
    assert build_splits(tiny_tokenizer(bos=True), [str(p)], 16, 0.1).stats["bos"] is True
    s = build_splits(tiny_tokenizer(), [str(p)], 16, 0.1)
    assert s.stats["bos"] is False and (s.train.input_ids[:, 0] != BOS).any()


def test_calibration_windows_start_with_the_bos(tmp_path):
    from otaro.methods.calib import calibration_windows

    p = tmp_path / "c.txt"
    p.write_text((SAMPLE_TEXT + "\n\n") * 10, encoding="utf-8")
    no = calibration_windows(tiny_tokenizer(), [str(p)], 4, 24)
    yes = calibration_windows(tiny_tokenizer(bos=True), [str(p)], 4, 24)
    assert no.shape == yes.shape == (4, 24)
    assert (yes[:, 0] == BOS).all() and not (no[:, 0] == BOS).all()
    # each window's text is a contiguous stretch of the calibration stream
    from otaro.training.data import load_examples, token_stream

    stream, _ = token_stream(tiny_tokenizer(), load_examples([str(p)]), 0)
    s = list(stream)
    for row in yes[:, 1:].tolist():
        assert any(s[i : i + 23] == row for i in range(len(s) - 22))
