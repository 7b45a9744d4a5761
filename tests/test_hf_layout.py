"""Hugging Face GPTQ / AWQ folders (otaro.hf): layouts bit-exact against the ecosystems' own code,
model round trips, `otaro quantize --save-format hf`, reading them back (load_source, eval,
export), truthful variant names, and onnxruntime-genai's model builder on our folders.
"""

import json
import shutil
import types

import numpy as np
import pytest
import torch

from otaro import checkpoint, hf
from otaro.arch.tiny import SAMPLE_TEXT, tiny_tokenizer
from otaro.errors import CheckpointError, FormatError, OtaroError
from otaro.formats import get_format
from otaro.hf import awq_layout, gptq_layout
from otaro.hf.layouts import LayerCodes, check_format, get_layout, plain_g_idx
from otaro.modules import IntLinear, convert
from otaro.quantize import QuantizeConfig, quantize

PROMPT = [3, 17, 40, 8, 99, 150, 21, 64, 5, 77, 12, 30]
NEW = 8


# --------------------------------------------------------------------------- fixtures


def _tiny32(seed=0):
    """A 2-layer llama whose every linear is a multiple of 32 wide (the GPTQ layout's rule),
    varied weights (std 0.15) so greedy continuations are not a repeated token."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def hf32(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf32") / "tiny32"
    _tiny32().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(SAMPLE_TEXT * 12, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def gptq_folder(hf32, calib_text, tmp_path_factory):
    """`otaro quantize --method gptq --format int4-g32-asym --save-format hf` of the tiny model."""
    out = tmp_path_factory.mktemp("gptq") / "tiny32-gptq"
    quantize(QuantizeConfig(model=str(hf32), output=str(out), method="gptq", format="int4-g32-asym",
                            calib=(str(calib_text),), calib_samples=4, calib_len=32, save_format="hf"))
    return out


def _buffers(model):
    return {k: v for k, v in model.state_dict().items()}


def _assert_same_model(a, b):
    sa, sb = _buffers(a), _buffers(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- layouts


def _autogptq_pack_qweight(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop (qlinear_cuda_old), transcribed: intweight [K, N]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def _codes(rng, bits, K=128, N=64, G=32, permute=False, sym=False):
    groups = K // G
    codes = rng.integers(1 if sym else 0, 2**bits, (N, K)).astype(np.uint8)
    zeros = (np.full((N, groups), 2 ** (bits - 1)) if sym else rng.integers(0, 2**bits, (N, groups))).astype(np.uint8)
    zeros[0, 0] = 0 if not sym else zeros[0, 0]  # the v1 wrap case
    scales = rng.random((N, groups)).astype(np.float16).astype(np.float32)
    g_idx = plain_g_idx(K, G)
    if permute:  # an act-order g_idx without static groups: groups scattered over the columns
        g_idx = rng.permutation(g_idx).astype(np.int32)
    return LayerCodes(codes, zeros, scales, g_idx, bits, G)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_is_autogptqs_bit_for_bit(bits):
    rng = np.random.default_rng(bits)
    u = rng.integers(0, 2**bits, (96 if bits == 3 else 64, 40))
    assert np.array_equal(gptq_layout.pack_stream(u, bits), _autogptq_pack_qweight(u, bits))
    assert np.array_equal(gptq_layout.unpack_stream(gptq_layout.pack_stream(u, bits), bits), u)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_layout_round_trip_is_exact(bits, permute, sym):
    t = _codes(np.random.default_rng(10 * bits + permute), bits, permute=permute, sym=sym)
    p = gptq_layout.pack(t)
    K, N, G = t.in_features, t.out_features, t.group_size
    assert p["qweight"].dtype == np.int32 and p["qweight"].shape == (K * bits // 32, N)
    assert p["qzeros"].dtype == np.int32 and p["qzeros"].shape == (K // G, N * bits // 32)
    assert p["scales"].dtype == np.float16 and p["scales"].shape == (K // G, N)
    assert p["g_idx"].dtype == np.int32 and np.array_equal(p["g_idx"], t.g_idx)
    back = gptq_layout.unpack(p, {"checkpoint_format": "gptq"}, bits, G)
    for f in ("codes", "zeros", "scales", "g_idx"):
        assert np.array_equal(getattr(back, f), getattr(t, f)), f


def test_gptq_v1_stores_zero_minus_one_and_wraps_zero_in_its_field():
    t = _codes(np.random.default_rng(0), 4)
    stored = gptq_layout.unpack_stream(np.ascontiguousarray(gptq_layout.pack(t)["qzeros"].T), 4).astype(int)
    want = (t.zeros.astype(int) - 1) % 16  # zero 0 -> 15 in its own nibble, no borrow into the next
    assert np.array_equal(stored, want) and stored[0, 0] == 15
    sym = _codes(np.random.default_rng(1), 4, sym=True)
    assert (gptq_layout.pack(sym)["qzeros"].view(np.uint32) == 0x77777777).all()  # 2^(b-1) - 1 per field
    v2 = gptq_layout.unpack(gptq_layout.pack(t, "gptq_v2"), {"checkpoint_format": "gptq_v2"}, 4, 32)
    assert np.array_equal(v2.zeros, t.zeros)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_onnxruntime_genai_gptq_reader_sees_our_codes(bits):
    """The consumer's own unpacking (GPTQModel.handle_qzeros + unpack) on our tensors."""
    from onnxruntime_genai.models.loaders.gptq import GPTQModel

    t = _codes(np.random.default_rng(bits), bits)
    p = {k: torch.from_numpy(v) for k, v in gptq_layout.pack(t).items()}
    reader = object.__new__(GPTQModel)
    mod = types.SimpleNamespace(qweight=p["qweight"], qzeros=p["qzeros"], scales=p["scales"], g_idx=p["g_idx"],
                                bits=bits, group_size=32, in_features=t.in_features, out_features=t.out_features)
    reader.handle_qzeros(mod)
    reader.unpack_qzeros(mod)
    reader.unpack_qweight(mod)
    assert np.array_equal(mod.qweight.numpy(), t.codes.T)  # [K, N]
    assert np.array_equal(mod.qzeros.numpy(), t.zeros.T)  # [K/G, N], the +1 undone


def test_awq_packing_order_and_round_trip():
    row = np.arange(8, dtype=np.uint8)[None]
    assert awq_layout.pack_interleaved(row).view(np.uint32)[0, 0] == 0x75316420  # nibble i = column ORDER[i]
    for sym in (False, True):
        t = _codes(np.random.default_rng(5), 4, sym=sym)
        p = awq_layout.pack(t)
        K, N = t.in_features, t.out_features
        assert p["qweight"].shape == (K, N // 8) and p["qzeros"].shape == (K // 32, N // 8)
        assert p["scales"].shape == (K // 32, N) and p["scales"].dtype == np.float16
        back = awq_layout.unpack(p, {}, 4, 32)
        for f in ("codes", "zeros", "scales", "g_idx"):
            assert np.array_equal(getattr(back, f), getattr(t, f)), f
    with pytest.raises(FormatError, match="no g_idx"):
        awq_layout.pack(_codes(np.random.default_rng(0), 4, permute=True))


def test_onnxruntime_genai_awq_reader_sees_our_codes():
    from onnxruntime_genai.models.loaders.awq import AWQModel

    t = _codes(np.random.default_rng(7), 4)
    p = {k: torch.from_numpy(v) for k, v in awq_layout.pack(t).items()}
    reader = object.__new__(AWQModel)
    mod = types.SimpleNamespace(qweight=p["qweight"], qzeros=p["qzeros"], scales=p["scales"], bits=4, group_size=32,
                                in_features=t.in_features, out_features=t.out_features)
    reader.unpack_qzeros(mod)
    reader.unpack_qweight(mod)
    assert np.array_equal(mod.qweight.numpy(), t.codes.T)
    assert np.array_equal(mod.qzeros.numpy(), t.zeros.T)


def test_layouts_refuse_what_their_consumers_cannot_read():
    gptq, awq = get_layout("gptq"), get_layout("awq")
    for name in ("int5-g32-asym", "int6-g64-sym", "int7-g128-asym"):
        with pytest.raises(FormatError, match="2/3/4/8-bit"):
            check_format(gptq, get_format(name))
    for name in ("int2-g32-asym", "int3-g32-sym", "int8-g32-asym"):
        with pytest.raises(FormatError, match="4-bit"):
            check_format(awq, get_format(name))
    with pytest.raises(FormatError, match="integer formats"):
        check_format(gptq, get_format("sefp-g64-trunc"))
    fmt = get_format("int4-g32-asym")
    with pytest.raises(FormatError, match="divisible by 32"):
        gptq.check_shape("mlp.down_proj", 136, 64, fmt)
    with pytest.raises(FormatError, match="group size 128"):
        gptq.check_shape("q_proj", 64 * 3, 64, get_format("int4-g128-asym"))
    with pytest.raises(FormatError, match="8 outputs"):
        awq.check_shape("k_proj", 64, 36, fmt)


# --------------------------------------------------------------------------- model round trips

ROUND_TRIPS = [("gptq", f"int{b}-g32-{s}") for b in (2, 3, 4, 8) for s in ("sym", "asym")] + [
    ("awq", "int4-g32-sym"), ("awq", "int4-g64-asym")]


def test_every_layout_is_round_tripped_and_every_int_method_has_one():
    from otaro.hf.layouts import LAYOUTS, METHOD_LAYOUTS
    from otaro.methods import METHODS

    assert {layout for layout, _ in ROUND_TRIPS} == set(LAYOUTS)
    assert set(METHOD_LAYOUTS.values()) <= set(LAYOUTS)
    # a new int method must say which layout its ecosystem reads before --save-format hf takes it
    assert {m.name for m in METHODS.values() if "int" in m.families} <= set(METHOD_LAYOUTS)


@pytest.mark.parametrize("layout,fmt", ROUND_TRIPS)
def test_model_round_trip_is_bit_exact(tmp_path, layout, fmt):
    model = convert(_tiny32(), fmt)
    hf.save(model, tmp_path / "q", tokenizer=tiny_tokenizer(), layout=layout)
    cfg = json.loads((tmp_path / "q/config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == layout and q["bits"] == get_format(fmt).bits and q["group_size"] == get_format(fmt).group_size
    assert cfg["architectures"] == ["LlamaForCausalLM"] and q["meta"]["otaro"]["format"] == fmt
    back = checkpoint.load(tmp_path / "q")
    assert back.otaro.fmt.name == fmt and back.otaro.layers == model.otaro.layers
    _assert_same_model(model, back)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_gptq_folder_is_what_transformers_and_autogptq_read(gptq_folder):
    from safetensors import safe_open
    from transformers import AutoConfig, GPTQConfig

    cfg = json.loads((gptq_folder / "config.json").read_text())
    q = cfg["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
        "sym": False}
    assert q["static_groups"] is True and q["damp_percent"] == 0.01
    assert q["meta"]["otaro"]["method"]["name"] == "gptq" and q["meta"]["otaro"]["method"]["config"]["act_order"]
    side = json.loads((gptq_folder / "quantize_config.json").read_text())
    assert side["bits"] == 4 and side["group_size"] == 32 and side["checkpoint_format"] == "gptq"
    GPTQConfig.from_dict(q)  # transformers' own validation of the keys
    assert AutoConfig.from_pretrained(gptq_folder).quantization_config["quant_method"] == "gptq"
    with safe_open(str(gptq_folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128 * 4 // 32, 64)
        assert f.get_tensor("model.layers.0.mlp.down_proj.qzeros").shape == (128 // 32, 64 * 4 // 32)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.down_proj.g_idx").dtype == torch.int32
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys and "lm_head.weight" not in keys
    assert not any(k.endswith(".zeros") or k.endswith(".weight") and ".layers." in k and "proj" in k for k in keys)


def test_awq_folder_config_is_what_transformers_reads(gptq_folder, tmp_path):
    from transformers import AwqConfig

    hf.save(checkpoint.load(gptq_folder), tmp_path / "awq", layout="awq")
    q = json.loads((tmp_path / "awq/config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["version"], q["bits"], q["group_size"], q["zero_point"]) == ("awq", "gemm", 4, 32, True)
    AwqConfig.from_dict(q)
    _assert_same_model(checkpoint.load(gptq_folder), checkpoint.load(tmp_path / "awq"))


def test_read_back_through_load_source_with_the_method_recorded(gptq_folder):
    from otaro.sources import load_source

    src = load_source(str(gptq_folder))
    assert src.kind == "checkpoint" and src.tokenizer is not None
    assert all(isinstance(src.model.get_submodule(n), IntLinear) for n in src.model.otaro.layers)
    m = checkpoint.read_manifest(gptq_folder)
    assert m["method"]["name"] == "gptq" and m["format"]["name"] == "int4-g32-asym"
    assert m["hf"]["layout"] == "gptq" and m["weights"]["sha256"] == m["hf"]["recorded_sha256"]
    assert m["source"]["model"].endswith("tiny32")
    with pytest.raises(OtaroError, match="already quantized"):
        quantize(QuantizeConfig(model=str(gptq_folder), output=str(gptq_folder) + "-again", format="int4-g32-asym"))


def test_a_foreign_symmetric_gptq_folder_reads_as_the_same_values(tmp_path):
    """Without otaro's meta the folder is read on its own terms: a symmetric GPTQ folder may use
    code 0 (AutoGPTQ does), so it becomes the asymmetric format with zeros 2^(b-1)."""
    model = convert(_tiny32(), "int4-g32-sym")
    hf.save(model, tmp_path / "q")
    cfg_path = tmp_path / "q/config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]["meta"]
    cfg_path.write_text(json.dumps(cfg))
    back = checkpoint.load(tmp_path / "q")
    assert back.otaro.fmt.name == "int4-g32-asym"
    assert checkpoint.read_manifest(tmp_path / "q")["method"]["name"] == "gptq"  # the producer's word
    for n in model.otaro.layers:
        assert torch.equal(model.get_submodule(n).quantized_weight(), back.get_submodule(n).quantized_weight())


def test_a_permuted_g_idx_or_a_corrupt_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf.save(convert(_tiny32(), "int4-g32-asym"), tmp_path / "q")
    w = tmp_path / "q/model.safetensors"
    state = load_file(str(w))
    key = "model.layers.0.self_attn.q_proj.g_idx"
    state[key] = torch.from_numpy(np.random.default_rng(0).permutation(state[key].numpy()))
    save_file(state, str(w), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "q")
    with pytest.raises(CheckpointError, match="g_idx is not column // 32"):
        checkpoint.load(tmp_path / "q", verify=False)


# --------------------------------------------------------------------------- quantize / CLI


def test_save_format_is_validated_before_any_work(hf32, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(OtaroError, match="--save-format"):
        QuantizeConfig(model=str(hf32), output=out, format="int4-g32-asym", save_format="gguf")
    with pytest.raises(FormatError, match="integer formats"):
        QuantizeConfig(model=str(hf32), output=out, save_format="hf")  # the default SEFP format
    with pytest.raises(FormatError, match="2/3/4/8-bit"):
        QuantizeConfig(model=str(hf32), output=out, format="int6-g32-asym", save_format="hf")
    from otaro.methods import METHODS

    if "awq" in METHODS:
        with pytest.raises(FormatError, match="4-bit"):
            QuantizeConfig(model=str(hf32), output=out, method="awq", format="int8-g32-asym", calib=("corpus:brown-train",),
                           save_format="hf")
    # tiny-llama's MLP is 136 wide: refused from the shapes, before calibration or any layer is touched
    with pytest.raises(FormatError, match="divisible by 32"):
        quantize(QuantizeConfig(model="tiny-llama", output=out, format="int4-g32-asym", save_format="hf"))
    assert not (tmp_path / "o").exists()


def test_cli_quantize_save_format_hf(hf32, tmp_path):
    from click.testing import CliRunner

    from otaro.cli import cli

    out = tmp_path / "rtn-hf"
    r = CliRunner().invoke(cli, ["quantize", str(hf32), "-o", str(out), "--format", "int8-g64-sym", "--save-format", "hf"])
    assert r.exit_code == 0, r.output
    m = checkpoint.read_manifest(out)
    assert m["method"]["name"] == "rtn" and m["method"]["config"]["save_format"] == "hf"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is True
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "int8-g64-sym" in r.output and "rtn" in r.output, r.output


def test_eval_reads_the_folder(gptq_folder, calib_text, tmp_path):
    from otaro.evaluation.run import EvalConfig, run_eval

    res = run_eval(EvalConfig(model=str(gptq_folder), texts=(str(calib_text),), bits=(4,), seq_len=32, max_windows=2),
                   show_progress=False)
    assert [r["format"] for r in res["rows"]] == ["int4-g32-asym"]
    assert res["rows"][0]["kld"] is not None  # reference: the source model the folder records


# --------------------------------------------------------------------------- export


def test_export_variant_names_tell_the_truth(hf32, gptq_folder, tmp_path):
    from otaro.export.artifact import ExportConfig, export

    sefp = tmp_path / "sefp"
    checkpoint.save(convert(_tiny32(), "sefp-g16-trunc"), sefp, tokenizer=tiny_tokenizer())
    rtn = tmp_path / "rtn"
    quantize(QuantizeConfig(model=str(hf32), output=str(rtn), format="int4-g32-asym"))
    for spec, claim in ((f"gptq={rtn}", "gptq, but .* records method rtn"),
                        (f"awq4={gptq_folder}", "awq, but .* records method gptq")):
        with pytest.raises(OtaroError, match=claim):
            export(ExportConfig(tmp_path / "no-such-main", tmp_path / "art", variants=(spec,)))
    # the HF folder as a variant: traced from its own int modules, validated against torch
    m = export(ExportConfig(sefp, tmp_path / "art", variants=(f"gptq={gptq_folder}",), accuracy_level=1,
                            validate_tokens=4))
    (v,) = m["variants"]
    assert v["name"] == "gptq" and v["format"] == "int4-g32-asym" and v["checkpoint_layout"] == "hf-gptq"
    assert v["method"]["name"] == "gptq" and v["method"]["config"]["calib_samples"] == 4
    assert all(r["greedy_equal"] for r in m["validation"]["results"])


# --------------------------------------------------------------------------- onnxruntime-genai

# onnxruntime-genai 0.18's builder runs through otaro.export.genai_builder (the exporter's
# --graph fused path), which supplies the two transformers-5 names it imports; everything the
# builder does with our folder — its GPTQ/AWQ loaders, repacking to MatMulNBits, the llama graph
# — is its own code.


def _genai_greedy(folder, prompt, n):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    logits = np.array(gen.get_output("logits"))[0]
    while not gen.is_done():
        gen.generate_next_token()
    return logits, [int(t) for t in gen.get_sequence(0)][len(prompt):]


def test_onnxruntime_genai_builder_runs_our_folders_like_torch(gptq_folder, tmp_path):
    pytest.importorskip("onnx_ir", reason="onnxruntime-genai's model builder needs onnx-ir (pip install onnx-ir)")
    from otaro.export.validate import torch_reference

    awq = tmp_path / "awq"
    hf.save(checkpoint.load(gptq_folder), awq, tokenizer=tiny_tokenizer(), layout="awq")
    # The head and embedding stay float (ours are); accuracy level 1 = fp32 activations (exact).
    opts = ["-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache"), "--extra_options",
            "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather", "accuracy_level=1", "hf_token=false"]
    jobs = [["-i", str(src), "-o", str(tmp_path / f"og-{src.name}"), *opts] for src in (gptq_folder, awq)]
    from otaro.export.genai_builder import run_builder

    run_builder(jobs, timeout=600)
    model = checkpoint.load(gptq_folder)
    ref_logits, ref_tokens = torch_reference(model, PROMPT, NEW)
    assert len(set(ref_tokens)) > 2  # a real continuation, not one repeated token
    for src in (gptq_folder, awq):
        out = tmp_path / f"og-{src.name}"
        import onnx

        g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        assert sum(n.op_type == "MatMulNBits" for n in g.node) >= 2 * 5  # qkv (packed), o, gate, up, down
        logits, tokens = _genai_greedy(out, PROMPT, NEW)
        assert np.abs(logits - ref_logits).max() <= 1e-3 * max(1.0, np.abs(ref_logits).max()), src.name
        assert tokens == ref_tokens, src.name
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
