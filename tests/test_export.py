"""`otaro export --format onnx` on tiny random models of every registered architecture.

Each artifact is exported once per session with exact MatMulNBits (accuracy_level 1) so that
greedy tokens can be compared with torch token for token, then run in (a) a plain
onnxruntime session driven by our decode loop, (b) optimum's ORTModelForCausalLM.generate,
(c) onnxruntime-genai — at every bit-width of the single model and for every variant.
"""

import json
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from otaro import checkpoint
from otaro.runtime.artifact import FORMAT_VERSION
from otaro.arch import ARCHS
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.cli import cli
from otaro.export import validate
from otaro.export.artifact import ExportConfig, export
from otaro.formats import onnx_ops as ops
from otaro.modules import convert
from otaro.runtime.artifact import MANIFEST, read_manifest, verify_files
from otaro.runtime.decoder import Decoder

# Each architecture exercises one decode body of the SEFP function, with power-of-two (sefp) or
# fp16 (ssfp) group scales.
ROUNDING = {"llama": "sefp-g16-trunc", "qwen2": "sefp-g16-nearest", "mistral": "sefp-g16-midpoint",
            "gemma": "ssfp-g16-trunc", "phi3": "ssfp-g16-nearest", "gpt_neox": "ssfp-g16-midpoint",
            "gemma3": "sefp-g16-nearest", "qwen3": "ssfp-g16-trunc", "smollm3": "sefp-g16-midpoint"}
PROMPT = list(range(3, 19))
NEW = 6


def _checkpoints(root, arch):
    sefp = convert(tiny_model(arch, init_std=0.15), ROUNDING[arch])
    checkpoint.save(sefp, root / "sefp", tokenizer=tiny_tokenizer())
    q = convert(tiny_model(arch, init_std=0.15), "int4-g16-asym")
    checkpoint.save(q, root / "int4", tokenizer=tiny_tokenizer())
    return root / "sefp", root / "int4"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"export-{arch}")
            sefp, int4 = _checkpoints(root, arch)
            export(ExportConfig(sefp, root / "art", variants=("sefp:3", f"rtn4={int4}"), accuracy_level=1,
                                validate_tokens=NEW))
            cache[arch] = (root / "art", sefp, int4)
        return cache[arch]

    return get


def _torch_greedy(model, n=NEW):
    return validate.torch_reference(model, PROMPT, n)[1]


def _expected(arch, sefp, int4):
    """{(model, bits): greedy tokens of the torch model}."""
    m = checkpoint.load(sefp)
    out = {}
    for b in range(2, 9):
        m.set_precision(b)
        out[("main", b)] = _torch_greedy(m)
    out[("sefp-b3", 3)] = out[("main", 3)]
    out[("rtn4", 4)] = _torch_greedy(checkpoint.load(int4))
    return out


def _exact_options():
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return so


def _paths(art):
    yield "main", art / "model.onnx", range(2, 9)
    yield "sefp-b3", art / "variants/sefp-b3/model.onnx", [3]
    yield "rtn4", art / "variants/rtn4/model.onnx", [4]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_validates_every_bits_and_variant(artifacts, arch):
    art, _, _ = artifacts(arch)
    m = read_manifest(art)
    verify_files(art, m["model"]["files"])
    verify_files(art, m["files"])
    for v in m["variants"]:
        verify_files(art / v["path"], v["files"])
    res = m["validation"]["results"]
    assert [(r["model"], r["bits"]) for r in res] == [("main", b) for b in range(2, 9)] + [("sefp-b3", 3), ("rtn4", 4)]
    assert all(r["passed"] and r["greedy_equal"] for r in res)
    assert max(r["max_abs_diff"] for r in res) < 1e-4  # exact mode: fp32 summation order only
    assert {v["name"]: v["container_bits"] for v in m["variants"]} == {"sefp-b3": 4, "rtn4": 4}
    # Nothing of the float weights of a quantized linear is left in the single model.
    g = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type.startswith(ops.SEFP_OP) for n in g.node) == len(m["layers"])
    assert not [n for n in g.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in g.initializer}
                and any(d > 1 for d in next(i for i in g.initializer if i.name == n.input[1]).dims[:1])
                and n.name.endswith("_proj/MatMul")]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_plain_session_optimum_and_genai_give_torch_greedy_tokens(artifacts, arch):
    import onnxruntime_genai as og
    from optimum.onnxruntime import ORTModelForCausalLM

    art, sefp, int4 = artifacts(arch)
    expected = _expected(arch, sefp, int4)
    # optimum 0.1.0's ORTModelForCausalLM sizes its empty KV cache with hidden/heads (it reads
    # head_dim for Gemma types only), so a model whose head_dim differs (Qwen3) cannot run
    # there; our loop and genai read the size from the graph.
    hf_cfg = json.loads((art / "config.json").read_text())
    optimum_fits = hf_cfg.get("head_dim") in (None, hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]) \
        or hf_cfg["model_type"].startswith("gemma")
    for name, path, bits_list in _paths(art):
        for b in bits_list:
            want = expected[(name, b)]
            with validate.graph_variant(path, bits=b if name == "main" else None) as g:
                # (a) a plain InferenceSession in our KV-cache loop
                dec = Decoder(ort.InferenceSession(str(g), _exact_options(), providers=["CPUExecutionProvider"]))
                assert dec.greedy(PROMPT, NEW) == want, (name, b, "onnxruntime")
                # (b) optimum
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if optimum_fits:
                        om = ORTModelForCausalLM.from_pretrained(path.parent, file_name=g.name, use_cache=True,
                                                                 session_options=_exact_options())
                        ids = torch.tensor([PROMPT])
                        out = om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                          do_sample=False, min_new_tokens=NEW, pad_token_id=0)
                        assert out[0, len(PROMPT):].tolist() == want, (name, b, "optimum")
                # (c) onnxruntime-genai, pointed at this graph through a config overlay
                cfg = og.Config(str(path.parent))
                cfg.overlay(json.dumps({"model": {"decoder": {"filename": g.name}}}))
                model = og.Model(cfg)
                p = og.GeneratorParams(model)
                p.set_search_options(max_length=len(PROMPT) + NEW, do_sample=False)
                gen = og.Generator(model, p)
                gen.append_tokens(np.array([PROMPT], np.int32))
                toks = []
                while not gen.is_done():
                    gen.generate_next_token()
                    toks.append(int(gen.get_next_tokens()[0]))
                assert toks == want, (name, b, "onnxruntime-genai")


def test_genai_config_sets_the_accuracy_level_and_io(artifacts):
    art, _, _ = artifacts("gemma")
    cfg = json.loads((art / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "1"
    assert "position_ids" not in dec["inputs"]  # optimum's gemma graph has none
    assert dec["num_hidden_layers"] == 2 and cfg["model"]["vocab_size"] == 320


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_tied_head_is_stored_once(artifacts, arch):
    art, _, _ = artifacts(arch)  # both tiny configs tie the head to the embedding
    for path in (art / "model.onnx", art / "variants/rtn4/model.onnx"):
        g = onnx.load(str(path), load_external_data=False).graph
        assert len([i for i in g.initializer if sorted(i.dims) == [64, 320]]) == 1


def test_a_wrong_bit_width_fails_validation(artifacts):
    art, sefp, _ = artifacts("llama")
    model = checkpoint.load(sefp)
    model.set_precision(7)  # the ONNX model is run at 8
    c = validate.check("main", art / "model.onnx", model, 8, PROMPT, 2, 1, sefp_bits=True)
    assert not c.passed and c.max_abs_diff > 10 * c.tolerance


def test_default_bits_and_accuracy_level_are_recorded(tmp_path):
    sefp, _ = _checkpoints(tmp_path, "llama")
    m = export(ExportConfig(sefp, tmp_path / "art", default_bits=4, variants=("sefp:8",), validate=False))
    g = onnx.load(str(tmp_path / "art/model.onnx"), load_external_data=False).graph
    bits = next(i for i in g.initializer if i.name == ops.BITS_INPUT)
    assert onnx.numpy_helper.to_array(bits) == 4 and m["default_bits"] == 4
    assert m["validation"] == {"skipped": True}
    vg = onnx.load(str(tmp_path / "art/variants/sefp-b8/model.onnx"), load_external_data=False).graph
    assert {a.i for n in vg.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"} == {4}
    # the file runs at its default precision in a stock session
    model = checkpoint.load(sefp)
    model.set_precision(4)
    dec = Decoder(ort.InferenceSession(str(tmp_path / "art/model.onnx"), _exact_options()))
    np.testing.assert_allclose(dec.prompt_logits(PROMPT), validate.torch_reference(model, PROMPT, 0)[0], atol=1e-4)


# -- the command line and bad input ---------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_cli_export_and_inspect(tmp_path):
    sefp, int4 = _checkpoints(tmp_path, "qwen2")
    r = _invoke("export", sefp, "-o", tmp_path / "art", "--variant", "sefp:2,4", "--variant", int4,
                "--validate-tokens", 2)
    assert r.exit_code == 0, r.output
    assert "validated 10/10" in r.output
    r = _invoke("inspect", tmp_path / "art")
    assert r.exit_code == 0, r.output
    for s in ("sefp-g16-nearest", "variants/sefp-b2", "variants/int4-g16-asym", "one file for all 7 precisions",
              "validation vs torch"):
        assert s in r.output
    r = _invoke("inspect", tmp_path / "art", "--json")
    assert json.loads(r.output)["otaro_artifact"] == FORMAT_VERSION == 3


def _fails(*args, match):
    r = _invoke(*args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and match in r.output, r.output
    return r


def test_bad_input_is_refused_before_any_output(tmp_path):
    sefp, int4 = _checkpoints(tmp_path, "llama")
    out = tmp_path / "art"
    _fails("export", int4, "-o", out, match="the exported model must be SEFP")
    _fails("export", tmp_path / "nope", "-o", out, match="does not exist")
    _fails("export", tmp_path, "-o", out, match="not an otaro checkpoint")
    _fails("export", sefp, "-o", out, "--variant", tmp_path / "missing", match="variant source")
    _fails("export", sefp, "-o", out, "--variant", sefp, match="must be integer")
    _fails("export", sefp, "-o", out, "--variant", "sefp:9", match="bit-width 9")
    _fails("export", sefp, "-o", out, "--variant", "sefp4", match="sefp:B")
    _fails("export", sefp, "-o", out, "--variant", "a=" + str(int4), "--variant", "a=" + str(int4), match="twice")
    other = tmp_path / "other"
    q = convert(tiny_model("qwen2"), "int4-g16-asym")
    checkpoint.save(q, other)
    _fails("export", sefp, "-o", out, "--variant", other, match="different model")
    assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("x")
    _fails("export", sefp, "-o", out, match="already exists")
    assert (out / "keep").read_text() == "x"


def test_corrupt_or_unsupported_checkpoints(tmp_path):
    sefp, _ = _checkpoints(tmp_path, "llama")
    bad = tmp_path / "bad"
    shutil.copytree(sefp, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(100)
    _fails("export", bad, "-o", tmp_path / "o1", match="corrupt or truncated")
    alien = tmp_path / "alien"
    shutil.copytree(sefp, alien)
    man = json.loads((alien / "otaro.json").read_text())
    cfg = json.loads((alien / "config.json").read_text())
    man["model_type"] = cfg["model_type"] = "bert"
    (alien / "otaro.json").write_text(json.dumps(man))
    (alien / "config.json").write_text(json.dumps(cfg))
    _fails("export", alien, "-o", tmp_path / "o2", match="bert")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_failed_validation_or_interruption_leaves_nothing(tmp_path, monkeypatch):
    sefp, _ = _checkpoints(tmp_path, "llama")
    monkeypatch.setattr(validate, "REL_TOL", 0.0)
    _fails("export", sefp, "-o", tmp_path / "art", match="validation against torch failed")
    monkeypatch.undo()

    from otaro.export import rewrite

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rewrite, "rewrite_matmulnbits", boom)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(sefp, tmp_path / "art", variants=("sefp:4",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4", "sefp"]
    assert not (tmp_path / "art" / MANIFEST).exists()
