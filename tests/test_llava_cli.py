"""A local LLaVA folder through the command line: `otaro quantize` (rtn, qslaw on text data),
the checkpoint it writes loaded back as LlavaForConditionalGeneration, `otaro eval` on it, and
the commands and options that refuse a multimodal model in one line (otaro.arch.multimodal)."""

import json

import pytest
import torch
from click.testing import CliRunner

from otaro import checkpoint
from otaro.cli import cli

FMT = "ssfp-g16-nearest"
QSLAW = ("--method", "qslaw", "--format", FMT, "--bits", "4:1,8:1", "--qslaw-steps", 4, "--qslaw-warmup", 4,
         "--qslaw-seq-len", 32, "--qslaw-batch-size", 2, "--qslaw-lr", 5e-2)
VISION, PROJECTOR, LAYERS = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model.layers."


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _llava():
    from transformers import LlavaForConditionalGeneration

    from otaro.arch.multimodal import tiny_llava_config

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny LLaVA saved as a Hugging Face folder (safetensors + tokenizer), as a user has one."""
    from otaro.arch.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("llava") / "tiny-llava"
    _llava().save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from otaro.arch.tiny import SAMPLE_TEXT

    path = tmp_path_factory.mktemp("text") / "task.txt"
    path.write_text(SAMPLE_TEXT * 12, encoding="utf-8")
    return path


def _quantize(folder, out, *options):
    """`otaro quantize`, returning the model exactly as checkpoint.save received it."""
    saved = {}
    save = checkpoint.save

    def capture(model, path, **kw):
        saved["model"] = model
        return save(model, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", capture)
        res = invoke("quantize", folder, "-o", out, *options)
    assert res.exit_code == 0, res.output
    return saved["model"]


@pytest.fixture(scope="module")
def runs(folder, text, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    qslaw = _quantize(folder, root / "qslaw", *QSLAW, "--qslaw-data", text)
    _quantize(folder, root / "rtn", "--method", "rtn", "--format", FMT)
    return {"qslaw": root / "qslaw", "rtn": root / "rtn", "qslaw_model": qslaw}


def _stored(path):
    from safetensors.torch import load_file

    return load_file(str(path / checkpoint.WEIGHTS))


def _inputs():
    """Text with one 16x16 image (4 image tokens, the last id of the tiny vocabulary)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 12), generator=gen)
    ids[:, 1:5] = 319
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}


def test_a_llava_folder_loads_as_llava(folder):
    from transformers import LlavaForConditionalGeneration

    from otaro.sources import load_source

    src = load_source(str(folder))
    assert type(src.model) is LlavaForConditionalGeneration and src.kind == "hf"
    assert src.tokenizer is not None and not src.model.training
    ref = _llava().state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in src.model.state_dict().items())


def test_qslaw_on_text_changes_only_the_scales(folder, runs):
    from transformers import LlavaForConditionalGeneration

    model = checkpoint.load(runs["qslaw"])
    assert type(model) is LlavaForConditionalGeneration
    manifest = model.otaro_manifest
    assert manifest["arch"] == manifest["model_type"] == "llava" and manifest["method"]["name"] == "qslaw"
    assert all(n.startswith(LAYERS) or n == "lm_head" for n in manifest["layers"])
    qslaw, rtn = _stored(runs["qslaw"]), _stored(runs["rtn"])
    assert set(qslaw) == set(rtn)
    # the vision tower and the projector are the source's float weights, bit for bit
    source = _llava().state_dict()
    kept = [k for k in qslaw if k.startswith((VISION, PROJECTOR))]
    assert kept and all(torch.equal(qslaw[k], source[k]) for k in kept)
    # the codes are RTN's; what moved is language-model group scales only
    codes = [k for k in qslaw if k.endswith(".mantissa")]
    assert codes and all(torch.equal(qslaw[k], rtn[k]) for k in codes)
    changed = {k for k in qslaw if not torch.equal(qslaw[k], rtn[k])}
    assert changed and all(k.startswith(LAYERS) and k.endswith(".scale") for k in changed), changed
    report = json.loads((runs["qslaw"] / "qslaw.json").read_text())
    # text rows never run the projector: auto leaves it frozen, the vision tower always is
    assert report["trained"] and all(n.endswith(".factor") for n in report["trained"])


def test_a_frozen_projector_gives_the_same_checkpoint(folder, text, runs, tmp_path):
    _quantize(folder, tmp_path / "frozen", *QSLAW, "--qslaw-data", text, "--qslaw-projector", "freeze")
    frozen, auto = _stored(tmp_path / "frozen"), _stored(runs["qslaw"])
    assert set(frozen) == set(auto) and all(torch.equal(frozen[k], auto[k]) for k in auto)


def test_loading_reproduces_the_saved_model_exactly(runs):
    from otaro.modules import set_precision

    saved, loaded = runs["qslaw_model"], checkpoint.load(runs["qslaw"])
    assert type(loaded) is type(saved)
    a, b = checkpoint.quantized_state_dict(saved), checkpoint.quantized_state_dict(loaded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    stored = _stored(runs["qslaw"])
    assert set(stored) == set(b) and all(torch.equal(stored[k], b[k]) for k in b)
    with torch.no_grad():
        for bits in (4, 8):
            set_precision(saved, bits)
            set_precision(loaded, bits)
            assert torch.equal(saved(**_inputs()).logits, loaded(**_inputs()).logits), bits
            text_only = {"input_ids": torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(4))}
            assert torch.equal(saved(**text_only).logits, loaded(**text_only).logits), bits
    set_precision(saved, 8)


def test_eval_scores_a_llava_checkpoint_against_its_source(runs, text, tmp_path):
    res = invoke("eval", runs["qslaw"], "--text", text, "--bits", "4,8", "--seq-len", 32, "--max-windows", 2,
                 "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [r["bits"] for r in report["rows"]] == [4, 8] and all(r["kld"] is not None for r in report["rows"])


@pytest.mark.parametrize("method, fmt, options", [
    ("gptq", "int4-g32-asym", ("--calib-samples", 4, "--calib-len", 32)),
    ("awq", "int4-g32-asym", ("--calib-samples", 4, "--calib-len", 32, "--search-samples", 2)),
])
def test_calibrated_methods_quantize_the_language_model_as_the_text_model_alone(folder, text, tmp_path, method, fmt,
                                                                                options):
    """Why the single-task methods are allowed: the codes equal those of the same text model
    saved on its own (the language model + the head, as a LlamaForCausalLM folder)."""
    from transformers import AutoModelForCausalLM

    from otaro.arch.tiny import tiny_tokenizer

    llava = _llava()
    alone = AutoModelForCausalLM.from_config(llava.config.text_config).eval()
    prefix = "model.language_model."
    state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): t for k, t in llava.state_dict().items()}
    alone.load_state_dict({k: t for k, t in state.items() if k in alone.state_dict()}, strict=True)
    alone.save_pretrained(tmp_path / "text", safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path / "text")
    for name, src in (("llava", folder), ("text", tmp_path / "text")):
        res = invoke("quantize", src, "-o", tmp_path / f"q-{name}", "--method", method, "--format", fmt,
                     "--calib", text, *options)
        assert res.exit_code == 0, res.output
    a, b = _stored(tmp_path / "q-llava"), _stored(tmp_path / "q-text")
    layers = [k for k in a if k.startswith(LAYERS)]
    assert layers and all(torch.equal(a[k], b["model." + k[len(prefix):]]) for k in layers)


def _one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_refuses_a_llava_checkpoint(runs, tmp_path):
    out = tmp_path / "art"
    _one_line_error(invoke("export", runs["qslaw"], "-o", out), "otaro export does not support llava (multimodal)")
    _one_line_error(invoke("export", runs["rtn"], "-o", out, "--variant", f"v={runs['qslaw']}"),
                    "otaro export does not support llava")
    assert not out.exists()


def test_what_cannot_take_a_llava_folder_says_so_in_one_line(folder, text, tmp_path):
    out = tmp_path / "out"
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    _one_line_error(invoke("quantize", folder, "-o", out, "--method", "mlgptq", "--format", "int4-g32-asym",
                           "--task", f"a={adapter}:{text}"),
                    "--method mlgptq does not support llava (multimodal) models", "LoRA")
    _one_line_error(invoke("quantize", folder, "-o", out, "--format", "int4-g32-asym", "--save-format", "hf"),
                    "--save-format hf does not support llava")
    _one_line_error(invoke("quantize", folder, "-o", out, *QSLAW, "--qslaw-data", text, "--qslaw-projector", "train"),
                    "--qslaw-projector train: the qslaw data has no images")
    _one_line_error(invoke("finetune", folder, "--data", text, "-o", out, "--steps", 1),
                    "otaro finetune does not support llava (multimodal) models")
    assert not out.exists() and not (tmp_path / "out.run").exists()


def test_a_llava_with_an_unsupported_language_model_fails_before_its_weights(tmp_path):
    from transformers import CLIPVisionConfig, GPT2Config, LlavaConfig

    from otaro.sources import load_source

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=16, patch_size=8),
                         text_config=GPT2Config(n_layer=1, n_embd=32, n_head=2))
    config.save_pretrained(tmp_path)  # no weights at all: the architecture is refused first
    from otaro.errors import OtaroError

    with pytest.raises(OtaroError, match="the language model of this llava model: architecture 'gpt2' is not"):
        load_source(str(tmp_path))
