import json

import pytest
import torch
from click.testing import CliRunner

from otaro.cli import cli

VERBS = ["formats", "quantize", "eval", "inspect", "finetune", "export", "run", "profile"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("verb", [None] + VERBS)
def test_help_of_every_command(verb):
    res = invoke(*([verb] if verb else []), "--help")
    assert res.exit_code == 0
    assert "Usage:" in res.output
    if verb is None:
        for v in VERBS:
            assert v in res.output


def test_profile_without_an_artifact_says_what_it_needs():
    res = invoke("profile")  # built (tests/test_profile.py); a bare call is a usage error, not a traceback
    assert res.exit_code == 2 and "give an ARTIFACT" in res.output


def test_formats_lists_the_table():
    res = invoke("formats")
    assert res.exit_code == 0 and "sefp-g64-trunc" in res.output and "int4-g128-asym" in res.output
    rows = json.loads(invoke("formats", "--json", "--family", "sefp").output)
    row = next(r for r in rows if r["name"] == "sefp-g64-trunc")
    assert row["bits_per_weight"]["4"] == 4.125


def test_quantize_inspect_eval_end_to_end(tmp_path, text_file):
    ck = tmp_path / "ck"
    res = invoke("quantize", "tiny-llama", "-o", ck, "--format", "sefp-g64-trunc")
    assert res.exit_code == 0, res.output
    res = invoke("inspect", ck)
    assert res.exit_code == 0 and "sefp-g64-trunc" in res.output and "llama" in res.output
    res = invoke("eval", ck, "--text", text_file, "--bits", "2-8", "--seq-len", 32, "--max-windows", 2, "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [r["bits"] for r in report["rows"]] == list(range(2, 9))
    assert (tmp_path / "ev" / "eval.png").stat().st_size > 1000


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny model saved as a Hugging Face folder, as a user would point at it."""
    from otaro.arch.tiny import tiny_model, tiny_tokenizer

    path = tmp_path / "hf"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_quantize_a_hugging_face_folder(tmp_path, hf_folder):
    res = invoke("quantize", hf_folder, "-o", tmp_path / "q", "--format", "int4-g64-asym")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q" / "otaro.json").is_file()


def _fails(res, *needles):
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, res.output


def test_bad_input_gets_one_clear_line_and_no_output(tmp_path, hf_folder, text_file):
    out = tmp_path / "out"
    _fails(invoke("quantize", tmp_path / "missing", "-o", out), "no such folder")
    (tmp_path / "empty").mkdir()
    _fails(invoke("quantize", tmp_path / "empty", "-o", out), "not a Hugging Face model folder")
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(cfg))
    _fails(invoke("quantize", bert, "-o", out), "not supported", "llama", "qwen2")
    _fails(invoke("quantize", hf_folder, "-o", out, "--format", "sefp-g48-trunc"), "group size 48 is not a power of two")
    _fails(invoke("quantize", hf_folder, "-o", out, "--format", "sefp-g64-trnc"), "unknown SEFP rounding")
    _fails(invoke("eval", "tiny-llama", "--text", text_file, "--bits", "1-8"), "bit-width 1 is not supported")
    _fails(invoke("eval", "tiny-llama", "--text", text_file, "--bits", "9"), "bit-width 9")
    _fails(invoke("eval", "tiny-llama", "--corpus", "nope"), "not a corpus")
    _fails(invoke("inspect", tmp_path / "empty"), "not an otaro checkpoint")
    assert not out.exists()


def test_group_size_that_is_not_a_power_of_two_is_refused():
    from otaro.errors import FormatError
    from otaro.formats import SEFPFormat

    with pytest.raises(FormatError, match="not a power of two"):
        SEFPFormat(group_size=48)


def test_non_finite_weights_are_refused_without_output(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    wfile = next(hf_folder.glob("*.safetensors"))
    state = load_file(str(wfile))
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key][0, 0] = float("inf")
    save_file(state, str(wfile), metadata={"format": "pt"})
    _fails(invoke("quantize", hf_folder, "-o", tmp_path / "o"), "non-finite", "down_proj")
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, text_file):
    ck = tmp_path / "ck"
    assert invoke("quantize", "tiny-llama", "-o", ck).exit_code == 0
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    _fails(invoke("eval", ck, "--text", text_file), "corrupt or truncated")


def test_existing_output_needs_overwrite(tmp_path):
    ck = tmp_path / "ck"
    assert invoke("quantize", "tiny-llama", "-o", ck).exit_code == 0
    _fails(invoke("quantize", "tiny-llama", "-o", ck), "already exists")
    assert invoke("quantize", "tiny-llama", "-o", ck, "--overwrite", "--format", "int8-g64-sym").exit_code == 0
    assert json.loads((ck / "otaro.json").read_text())["format"]["name"] == "int8-g64-sym"
