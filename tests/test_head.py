"""The quantized LM head and embedding (otaro.head, ``--head-bits``): torch modules, checkpoints,
export, the runtime and the CLI, on tiny models of every head layout (tied llama, untied qwen2,
Gemma 3's scaled tied embedding, midpoint's 9-bit top code)."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from otaro import checkpoint
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.cli import cli
from otaro.errors import FormatError, OtaroError
from otaro.export.artifact import ExportConfig, export
from otaro.formats import get_format
from otaro.formats import torch_ref as Q
from otaro.head import SEFPEmbedding, default_head_bits, quantize_head
from otaro.modules import SEFPLinear, convert
from otaro.runtime import Runtime

PROMPT = list(range(3, 19))
# Exact mode (accuracy_level 1) differs from torch only by fp32 summation order (~1e-6 on logits
# of size ~10); one quantization step of a wrong head precision moves them by > 1e-2.
ATOL = 1e-4
CASES = {"llama": "sefp-g16-nearest", "qwen2": "sefp-g16-trunc", "gemma3": "sefp-g16-nearest", "phi3": "ssfp-g16-nearest",
         "mistral": "sefp-g16-midpoint"}


def _model(arch, fmt=None, head_bits=None):
    m = convert(tiny_model(arch, init_std=0.15), fmt or CASES[arch])
    return quantize_head(m, head_bits or default_head_bits(m.otaro.fmt))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"head-{arch}")
            checkpoint.save(_model(arch), root / "ck", tokenizer=tiny_tokenizer())
            man = export(ExportConfig(root / "ck", root / "art", variants=("sefp:4",), accuracy_level=1,
                                      validate_tokens=4))
            cache[arch] = root, man
        return cache[arch]

    return get


def test_embedding_rows_are_the_decoded_code():
    m = _model("qwen2")  # untied: the embedding has its own code
    emb, fmt = m.get_input_embeddings(), get_format(CASES["qwen2"])
    ids = torch.tensor([[0, 5, 319], [7, 7, 1]])
    table = Q.sefp_dequantize(emb.mantissa, emb.exponent, fmt.top_bits, fmt, emb.embedding_dim)
    assert torch.equal(emb(ids), table[ids])
    # and the code is the SEFP encoding of the float table
    src = tiny_model("qwen2", init_std=0.15).get_input_embeddings().weight.detach()
    assert torch.equal(table, Q.sefp_quantize(src, fmt, fmt.top_bits))


def test_a_tied_weight_is_stored_once_and_reads_the_heads_code(tmp_path):
    m = _model("llama")
    head, emb = m.get_output_embeddings(), m.get_input_embeddings()
    assert isinstance(head, SEFPLinear) and isinstance(emb, SEFPEmbedding) and emb.tied
    assert torch.equal(emb(torch.tensor([[4]]))[0, 0], head.quantized_weight(8)[4])  # head at 8 = the table
    checkpoint.save(m, tmp_path / "ck")
    man = json.loads((tmp_path / "ck" / "otaro.json").read_text())
    assert man["otaro_checkpoint"] == 3
    assert man["head"] == {"layer": "lm_head", "embedding": "model.embed_tokens", "tied": True, "bits": 8}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # one code for both: no float head, nothing stored under the embedding's name
    assert "lm_head.mantissa" in names and "lm_head.weight" not in names
    assert not any("embed_tokens" in n for n in names)
    m2 = checkpoint.load(tmp_path / "ck")
    assert m2.get_input_embeddings().source is m2.get_output_embeddings()
    x = torch.tensor([PROMPT])
    for b in (2, 8):
        m.set_precision(b), m2.set_precision(b)
        assert torch.equal(m(x).logits, m2(x).logits)


def test_head_has_its_own_precision():
    m = _model("llama", head_bits=6)
    x = torch.tensor([PROMPT])
    m.set_precision(4)
    assert m.get_precision()["lm_head"] == 6 and m.get_precision()["model.layers.0.mlp.up_proj"] == 4
    m.set_precision({"*": 3})  # a leading wildcard means decoder layers
    assert m.get_precision()["lm_head"] == 6
    m.set_precision({"lm_head": 8})
    assert m.get_precision()["lm_head"] == 8
    at8 = m(x).logits
    m.set_precision({"lm_head": 4})
    assert not torch.allclose(m(x).logits, at8, atol=1e-3)  # the head really switched
    m.set_precision(3)  # a bit-width resets the head to its own default
    assert m.get_precision()["lm_head"] == 6
    with pytest.raises(FormatError):
        m.set_precision({"lm_head": 9})


@pytest.mark.parametrize("arch", list(CASES))
def test_export_and_runtime_match_torch_at_every_bit_width(exported, arch):
    root, man = exported(arch)
    hb = 7 if arch == "mistral" else 8  # midpoint's 8-bit code has no container: its head defaults to 7
    assert man["head"]["layer"] == "lm_head" and man["head"]["bits"] == hb
    assert all(r["passed"] for r in man["validation"]["results"])  # stock onnxruntime on the files
    proto = onnx.load(str(root / "art" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert any(o.startswith("SefpGather") for o in ops) and "Transpose" not in {
        n.op_type for n in proto.graph.node if n.name.startswith("/otaro/tied_head")}
    # nothing of vocab x hidden stays float: the table lives as int8 codes only
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 320 * 64]
    assert floats == []
    m = checkpoint.load(root / "ck")
    rt = Runtime.load(root / "art", accuracy_level=1)
    x = torch.tensor([PROMPT])
    for b in m.otaro.fmt.bits:
        m.set_precision(b)
        rt.set_precision(b)
        assert rt.active_precision.uniform == b and rt.active_precision.bits[-1] == hb
        ref = m(x).logits[0].detach().numpy()
        np.testing.assert_allclose(rt.logits(PROMPT), ref, atol=ATOL, rtol=0)
    m.set_precision({"lm_head": 4})
    rt.set_precision({"lm_head": 4})
    np.testing.assert_allclose(rt.logits(PROMPT), m(x).logits[0].detach().numpy(), atol=ATOL, rtol=0)


def test_a_runtime_session_borrows_the_shared_code(exported):
    root, _ = exported("llama")
    rt = Runtime.load(root / "art", accuracy_level=1)
    assert "lm_head.mantissa" in rt.master.shared  # the tied gather's code: one copy per process
    rt.set_precision(4)
    rt.set_precision({"lm_head": 2})
    assert len(rt.warm_precisions) >= 2


def test_head_bits_float_keeps_a_float_head(tmp_path):
    r = CliRunner().invoke(cli, ["quantize", "tiny-llama", "-o", str(tmp_path / "f"), "--head-bits", "float"])
    assert r.exit_code == 0, r.output
    m = checkpoint.load(tmp_path / "f")
    assert m.otaro.head is None and "lm_head" not in m.otaro.layers
    assert type(m.get_input_embeddings()) is torch.nn.Embedding
    r = CliRunner().invoke(cli, ["quantize", "tiny-llama", "-o", str(tmp_path / "h6"), "--head-bits", "6"])
    assert r.exit_code == 0, r.output
    assert checkpoint.read_manifest(tmp_path / "h6")["head"]["bits"] == 6
    r = CliRunner().invoke(cli, ["quantize", "tiny-llama", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0 and checkpoint.read_manifest(tmp_path / "d")["head"]["bits"] == 8  # the default


@pytest.mark.parametrize("args, match", [
    (["--head-bits", "9"], "not auto, float or a bit-width"),
    (["--head-bits", "4", "--format", "int4-g64-asym"], "drop --head-bits"),
])
def test_bad_head_bits_are_refused_before_any_work(tmp_path, args, match):
    r = CliRunner().invoke(cli, ["quantize", "tiny-llama", "-o", str(tmp_path / "x"), *args])
    assert r.exit_code != 0 and match in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_int_formats_keep_a_float_head_by_default(tmp_path):
    r = CliRunner().invoke(cli, ["quantize", "tiny-llama", "-o", str(tmp_path / "i"), "--format", "int4-g64-asym"])
    assert r.exit_code == 0, r.output
    assert checkpoint.read_manifest(tmp_path / "i").get("head") is None


def test_quantize_head_refuses_what_it_cannot_do():
    with pytest.raises(OtaroError, match="quantize the model's linears first"):
        quantize_head(tiny_model("llama"), 8)
    m = convert(tiny_model("llama"), "int4-g64-asym")
    with pytest.raises(FormatError, match="float head"):
        quantize_head(m, 8)
    m = convert(tiny_model("llama"), "sefp-g16-nearest", packed=False)
    with pytest.raises(OtaroError, match="pack the model"):
        quantize_head(m, 8)
    m = _model("llama")
    with pytest.raises(OtaroError, match="already quantized"):
        quantize_head(m, 8)



def test_a_corrupt_head_record_is_one_clear_error(exported, tmp_path):
    import shutil

    from otaro.errors import CheckpointError
    from otaro.runtime.artifact import ArtifactError

    root, _ = exported("llama")
    ck = tmp_path / "ck"
    shutil.copytree(root / "ck", ck)
    man = json.loads((ck / "otaro.json").read_text())
    for bad in ({**man["head"], "bits": 11}, {**man["head"], "layer": "model.nope"}, {"layer": "lm_head"}):
        (ck / "otaro.json").write_text(json.dumps({**man, "head": bad}))
        with pytest.raises(CheckpointError):
            checkpoint.load(ck)
    art = tmp_path / "art"
    shutil.copytree(root / "art", art)
    am = json.loads((art / "otaro_artifact.json").read_text())
    (art / "otaro_artifact.json").write_text(json.dumps({**am, "head": {**am["head"], "layer": "model.nope"}}))
    with pytest.raises(ArtifactError, match="manifest head"):
        Runtime.load(art)
