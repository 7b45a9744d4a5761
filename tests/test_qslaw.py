"""QSLAW (otaro.methods.qslaw): learned group-scale factors on fixed RTN codes.

Tiny random models built in memory, offline, seeded: the task loss against RTN of the same
format (int and ssfp multi-bit), which tensors change (scales only; the projector too for
LLaVA), the warmup schedule, the fold (training forward == packed layer == reloaded
checkpoint), and the bad inputs (Python API and CLI)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from otaro import checkpoint
from otaro.arch.tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer
from otaro.cli import cli
from otaro.errors import FormatError, OtaroError
from otaro.formats import get_format
from otaro.methods.qslaw import (QSLAWSettings, RowSource, bit_schedule, lr_at, mean_loss, mix_schedule, qslaw,
                                 text_rows)
from otaro.methods.qslaw_scales import ScaledLayer
from otaro.modules import IntLinear, SEFPLinear, convert
from otaro.quantize import QuantizeConfig

TARGETS = ((3, 1.0), (4, 1.0), (8, 1.0))
FORMATS = {"int3-g32-asym": (), "ssfp-g16-nearest": TARGETS}
SEQ = 32


def _model():
    return tiny_model("llama", init_std=0.15)


@pytest.fixture(scope="module")
def rows():
    """The task rows: a short English text, packed into 32-token blocks (88 rows)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "task.txt"
        p.write_text(SAMPLE_TEXT * 12, encoding="utf-8")
        return text_rows(tiny_tokenizer(), [str(p)], SEQ, "task")


def _bits(fmt):
    return [b for b, _ in FORMATS[fmt]] or [None]


def _at(model, bits):
    if bits is not None:
        model.set_precision(bits)
    return model


@pytest.fixture(scope="module", params=sorted(FORMATS))
def trained(request, rows):
    """(format, RTN model, QSLAW model, report): 30 steps of task data only."""
    fmt = request.param
    rtn = convert(_model(), fmt)
    model = _model()
    settings = QSLAWSettings(steps=30, warmup=30, lr=1e-2, batch_size=8, seq_len=SEQ, bits=FORMATS[fmt])
    report = qslaw(model, fmt, settings, rows)
    return fmt, rtn, model, report


# --------------------------------------------------------------------------- quality


def test_qslaw_lowers_the_task_loss_of_rtn_at_every_target(trained, rows):
    fmt, rtn, model, report = trained
    for b in _bits(fmt):
        before, after = mean_loss(_at(rtn, b), rows), mean_loss(_at(model, b), rows)
        assert after < before - 0.3, (fmt, b, before, after)  # measured: 0.65-0.86
    assert report.loss_last < report.loss_first


# --------------------------------------------------------------------------- what changes


def test_only_the_group_scales_change_and_the_codes_are_bit_identical(trained):
    fmt, rtn, model, report = trained
    scale_leaf = "scales" if fmt.startswith("int") else "scale"
    before, after = rtn.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    scales = {k for k in after if k.endswith("." + scale_leaf)}
    assert changed <= scales  # codes, zeros, norms, embeddings, head: untouched
    assert len(changed) == len(scales)  # every layer learned something
    for k in after:
        if k.endswith((".qweight", ".mantissa", ".zeros")):
            assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    # the optimizer saw the factors and nothing else; they are gone after the fold
    assert report.trained and all(n.endswith(".factor") for n in report.trained)
    assert len(report.trained) == len(model.otaro.layers)
    assert not any("factor" in n for n, _ in model.named_parameters())
    layer = model.get_submodule(model.otaro.layers[0])
    assert isinstance(layer, IntLinear if fmt.startswith("int") else SEFPLinear)
    stored = getattr(layer, scale_leaf)
    assert torch.equal(stored.to(torch.float16).to(stored.dtype), stored)  # fp16-representable


def test_multibit_sefp_trains_every_target_each_step(trained):
    fmt, _, _, report = trained
    if fmt.startswith("int"):
        assert report.bits_drawn == {"fixed": 30}
    else:
        assert report.bits_drawn == {"3": 30, "4": 30, "8": 30}


# --------------------------------------------------------------------------- fold


@pytest.mark.parametrize("fmt", ["int4-g32-asym", "int3-g16-sym", "ssfp-g16-nearest", "ssfp-g32-midpoint",
                                 "sefp-g16-trunc"])
def test_the_folded_layer_computes_exactly_what_training_computed(fmt):
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(40, 12)  # 40: a ragged last group
    lin.weight.data = torch.randn(12, 40, generator=gen)
    f = get_format(fmt)
    packed = (IntLinear if f.family == "int" else SEFPLinear).from_linear(lin, f)
    wrapper = ScaledLayer(packed)
    wrapper.factor.data = (1 + 0.3 * torch.randn(wrapper.factor.shape, generator=gen)).clamp(min=0.05)
    if f.family == "sefp" and f.scale == "pow2":  # whole exponent steps: make some groups move
        wrapper.factor.data *= 2.0 ** torch.randint(-2, 3, wrapper.factor.shape, generator=gen)
    bits = [f.bits] if f.family == "int" else [3, 4, 8]
    x = torch.randn(5, 40, generator=gen)
    expect = {}
    for b in bits:
        if f.family == "sefp":
            wrapper.set_bits(b)
        with torch.no_grad():
            expect[b] = (wrapper.weight_at(b).clone(), wrapper(x).clone())
    layer = wrapper.fold()
    for b in bits:
        if f.family == "sefp":
            layer.set_bits(b)
        assert torch.equal(layer.quantized_weight(b), expect[b][0]), b
        assert torch.equal(layer(x), expect[b][1]), b


def test_the_saved_checkpoint_loads_back_with_the_same_outputs(trained, tmp_path, rows):
    fmt, _, model, _ = trained
    path = checkpoint.save(model, tmp_path / "ck")
    loaded = checkpoint.load(path)
    x = rows["input_ids"][:2]
    for b in _bits(fmt):
        with torch.no_grad():
            assert torch.equal(_at(model, b)(input_ids=x).logits, _at(loaded, b)(input_ids=x).logits), b


# --------------------------------------------------------------------------- schedule


def test_the_warmup_schedule_is_task_only_then_one_to_one():
    plan = mix_schedule(10, 4, 3)
    assert plan[:4] == [(3, 0)] * 4
    assert plan[4:] == [(2, 1), (1, 2)] * 3  # odd batch: the extra row alternates
    assert sum(t for t, _ in plan) == 21 and sum(g for _, g in plan) == 9
    assert mix_schedule(6, 2, 4) == [(4, 0), (4, 0), (2, 2), (2, 2), (2, 2), (2, 2)]
    assert mix_schedule(5, 5, 2) == [(2, 0)] * 5  # η = steps: task data only
    assert mix_schedule(4, 0, 1) == [(1, 0), (0, 1), (1, 0), (0, 1)]


class _Counting(RowSource):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.drawn = []

    def take(self, k):
        self.drawn.append(k)
        return super().take(k)


def test_a_run_draws_exactly_the_scheduled_rows(rows):
    task, generic = _Counting(rows, 0, "task"), _Counting(rows, 1, "generic")
    settings = QSLAWSettings(steps=10, warmup=4, lr=1e-3, batch_size=3, seq_len=SEQ)
    report = qslaw(_model(), "int4-g32-asym", settings, task, generic)
    assert sum(task.drawn) == report.task_rows == 21
    assert sum(generic.drawn) == report.generic_rows == 9
    assert len(generic.drawn) == 6  # nothing generic during the 4 warmup steps
    # the batch order is seeded: the same run draws the same first rows
    again = RowSource(rows, 0, "task")
    first = RowSource(rows, 0, "task").take(5)["input_ids"]
    assert torch.equal(again.take(5)["input_ids"], first)


def test_bit_and_lr_schedules():
    assert bit_schedule(TARGETS, 2, "sum") == [((3, 1 / 3), (4, 1 / 3), (8, 1 / 3))] * 2
    drawn = bit_schedule(((3, 1.0), (8, 3.0)), 400, "sample", seed=0)
    assert drawn == bit_schedule(((3, 1.0), (8, 3.0)), 400, "sample", seed=0)
    n8 = sum(step[0][0] == 8 for step in drawn)
    assert 260 < n8 < 340  # ∝ λ: 3/4 of 400
    assert bit_schedule([(None, 1.0)], 3, "sample") == [((None, 1.0),)] * 3
    assert lr_at(0, 100, 1.0) == pytest.approx(1 / 3)  # 3 warm-up steps
    assert lr_at(3, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0) < 0.01


# --------------------------------------------------------------------------- LLaVA


def _llava():
    from transformers import LlavaForConditionalGeneration

    from otaro.arch.multimodal import tiny_llava_config

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def _image_rows(n=16, length=20, image_token=319):
    """Synthetic rows: BOS-like token, 4 image tokens (one 16x16 image = 4 patches), text; the
    image positions carry no loss."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (n, length), generator=gen)
    ids[:, 1:5] = image_token
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(n, 3, 16, 16, generator=gen)}


def test_llava_trains_only_the_projector_and_the_scales():
    fmt = "ssfp-g16-nearest"
    task = _image_rows()
    generic = {"input_ids": torch.randint(0, 300, (16, 20), generator=torch.Generator().manual_seed(1))}
    rtn = convert(_llava(), fmt)
    model = _llava()
    settings = QSLAWSettings(steps=12, warmup=6, lr=2e-2, batch_size=4, bits=((4, 1.0), (8, 1.0)))
    report = qslaw(model, fmt, settings, task, generic)
    assert model.otaro.arch == "llava"
    assert all(n.startswith("model.language_model.layers.") for n in model.otaro.layers)
    projector = {n for n in report.trained if not n.endswith(".factor")}
    assert projector and all(n.startswith("model.multi_modal_projector.") for n in projector)
    before, after = rtn.state_dict(), model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert {k for k in changed if not k.startswith("model.multi_modal_projector.")} == {
        k for k in after if k.endswith(".scale")}
    assert {k for k in changed if k.startswith("model.multi_modal_projector.")} == projector
    assert not any(k.startswith(("model.vision_tower.", "lm_head", "model.language_model.embed")) for k in changed)
    for k in after:  # codes bit-identical
        if k.endswith(".mantissa"):
            assert torch.equal(after[k], before[k]), k
    for b in (4, 8):
        assert mean_loss(_at(model, b), task) < mean_loss(_at(rtn, b), task), b
    assert (report.task_rows, report.generic_rows) == (36, 12)


def test_llava_with_the_projector_frozen_changes_only_scales():
    rtn = convert(_llava(), "int4-g32-asym")
    model = _llava()
    report = qslaw(model, "int4-g32-asym", QSLAWSettings(steps=3, warmup=3, lr=1e-2, batch_size=2,
                                                         projector="freeze"), _image_rows(4))
    assert all(n.endswith(".factor") for n in report.trained)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(rtn.state_dict()[k], v)}
    assert changed and all(k.endswith(".scales") for k in changed)


# --------------------------------------------------------------------------- bad input


def _untouched(model):
    return getattr(model, "otaro", None) is None and all(type(m) is not ScaledLayer for m in model.modules())


@pytest.mark.parametrize("kw, needle", [
    (dict(steps=4, warmup=5), "--qslaw-warmup (η) must be between 0 and --qslaw-steps = 4"),
    (dict(steps=0, warmup=0), "--qslaw-steps must be a positive integer"),
    (dict(lr=0.0), "--qslaw-lr must be a positive number"),
    (dict(batch_size=0), "--qslaw-batch-size must be a positive integer"),
    (dict(projector="yes"), "--qslaw-projector must be one of auto, train, freeze"),
])
def test_bad_settings_are_one_line_errors(kw, needle):
    with pytest.raises(OtaroError, match=None) as e:
        QSLAWSettings(**kw)
    assert needle in str(e.value)


def test_bad_inputs_fail_before_any_work(rows):
    model = _model()
    with pytest.raises(OtaroError, match="text-only model with no multimodal projector"):
        qslaw(model, "int4-g32-asym", QSLAWSettings(steps=2, warmup=2, projector="train"), rows)
    with pytest.raises(OtaroError, match="has images but LlamaForCausalLM is a text-only model"):
        qslaw(model, "int4-g32-asym", QSLAWSettings(steps=2, warmup=2), _image_rows(4))
    with pytest.raises(OtaroError, match="give --qslaw-generic"):
        qslaw(model, "int4-g32-asym", QSLAWSettings(steps=2, warmup=1), rows)
    with pytest.raises(FormatError, match="needs an int or SEFP format"):
        qslaw(model, "fp16", QSLAWSettings(steps=2, warmup=2), rows)
    assert _untouched(model)


def test_pow2_sefp_moves_group_exponents_by_whole_steps(rows):
    """Pow2 rows store exponents: the factor is rounded to a power of two (DESIGN §7.21)."""
    fmt = "sefp-g16-nearest"
    rtn = convert(_model(), fmt)
    model = _model()
    report = qslaw(model, fmt, QSLAWSettings(steps=10, warmup=10, lr=0.1, batch_size=8, seq_len=SEQ,
                                             bits=((4, 1.0), (8, 1.0))), rows)
    before, after = rtn.state_dict(), model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".exponent") for k in changed)
    moved = sum(int((after[k] != before[k]).sum()) for k in changed)
    assert moved == report.moved > 0
    for b in (4, 8):
        assert mean_loss(_at(model, b), rows) < mean_loss(_at(rtn, b), rows) - 0.3, b


def test_qslaw_trains_under_a_callers_no_grad(rows):
    """Benchmarks call method.run inside torch.no_grad(); the steps turn autograd on themselves
    and give the same model as a run without it."""
    settings = QSLAWSettings(steps=4, warmup=4, lr=1e-2, batch_size=4, seq_len=SEQ)
    plain, quiet = _model(), _model()
    qslaw(plain, "int3-g32-asym", settings, rows)
    with torch.no_grad():
        qslaw(quiet, "int3-g32-asym", settings, rows)
    a, b = plain.state_dict(), quiet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rtn = convert(_model(), "int3-g32-asym").state_dict()
    assert any(not torch.equal(a[k], rtn[k]) for k in a if k.endswith(".scales"))  # it did train


def test_quantize_config_checks_qslaw_options(tmp_path, text_file):
    base = dict(model="tiny-llama", output=str(tmp_path / "q"), method="qslaw", format="int4-g32-asym")
    with pytest.raises(OtaroError, match="needs task data"):
        QuantizeConfig(**base, qslaw_warmup=200)
    with pytest.raises(OtaroError, match="no such file"):
        QuantizeConfig(**base, qslaw_data=(str(tmp_path / "missing.txt"),), qslaw_warmup=200)
    with pytest.raises(OtaroError, match="only --method qslaw uses these options"):
        QuantizeConfig(model="tiny-llama", output=str(tmp_path / "q"), qslaw_steps=3)
    cfg = QuantizeConfig(**base, qslaw_data=f"{text_file},{text_file}", qslaw_warmup=200)
    assert cfg.qslaw_data == (str(text_file), str(text_file))


def _fails(res, *needles):
    """Non-zero, one ``Error:`` line, no traceback (as tests/test_badpaths.py)."""
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_bad_inputs_print_one_error_line(tmp_path, text_file):
    out = tmp_path / "q"
    common = ("quantize", "tiny-llama", "-o", out, "--method", "qslaw", "--qslaw-data", text_file,
              "--qslaw-generic", text_file, "--qslaw-seq-len", SEQ)
    _fails(_invoke(*common, "--qslaw-steps", 4, "--qslaw-warmup", 9), "--qslaw-warmup (η)", "= 4 (got 9)")
    _fails(_invoke(*common, "--qslaw-steps", 0, "--qslaw-warmup", 0), "--qslaw-steps must be a positive")
    _fails(_invoke(*common, "--qslaw-steps", 2, "--qslaw-warmup", 1, "--qslaw-projector", "train"),
           "no multimodal projector to train")
    _fails(_invoke("quantize", "tiny-llama", "-o", out, "--method", "qslaw", "--qslaw-warmup", 200),
           "needs task data")
    _fails(_invoke("quantize", "tiny-llama", "-o", out, "--method", "qslaw", "--qslaw-data", tmp_path / "nope.txt"),
           "no such file")
    _fails(_invoke("quantize", "tiny-llama", "-o", out, "--qslaw-steps", 3), "only --method qslaw")
    assert not out.exists()


def test_cli_quantize_qslaw_end_to_end(tmp_path, text_file):
    out = tmp_path / "q"
    res = _invoke("quantize", "tiny-llama", "-o", out, "--method", "qslaw", "--format", "ssfp-g16-nearest",
                  "--bits", "4,8", "--qslaw-data", text_file, "--qslaw-generic", text_file, "--qslaw-steps", 5,
                  "--qslaw-warmup", 2, "--qslaw-batch-size", 2, "--qslaw-seq-len", SEQ, "--qslaw-lr", 0.01)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "qslaw.json").read_text())
    assert (report["task_rows"], report["generic_rows"]) == (7, 3)
    assert report["bits_drawn"] == {"4": 5, "8": 5} and len(report["losses"]) == 5
    manifest = json.loads((out / "otaro.json").read_text())
    assert manifest["method"]["name"] == "qslaw" and manifest["method"]["config"]["qslaw_steps"] == 5
    model = checkpoint.load(out)
    assert model.otaro.fmt.name == "ssfp-g16-nearest"
