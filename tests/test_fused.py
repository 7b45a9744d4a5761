"""`otaro export --graph fused`: onnxruntime-genai's builder graph carrying our SEFP linears.

The exporter's own validation (exact MatMulNBits, every b) checks the fused graph against torch;
here: that it *is* the fused graph (GroupQueryAttention, far fewer nodes than the trace), that
the per-layer q/k/v split keeps every linear its own code, that right-padded batches decode
exactly like single prompts, that `auto` falls back to the trace where the builder does not
apply, and that bad requests are refused before any work.
"""

import collections
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from otaro import checkpoint
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import OtaroError
from otaro.export import genai_builder
from otaro.export.artifact import ExportConfig, export
from otaro.formats import onnx_ops as ops
from otaro.modules import convert
from otaro.runtime import Runtime
from otaro.runtime.artifact import read_manifest
from otaro.runtime.decoder import Batch, Decoder

pytestmark = pytest.mark.skipif(genai_builder.available() is not None,
                                reason="onnxruntime-genai's model builder (onnxruntime-genai, onnx-ir) not installed")
PROMPTS = [list(range(3, 19)), list(range(5, 11)), list(range(20, 41))]


def _ckpt(root, arch="llama", fmt="ssfp-g16-nearest", head_bits=None):
    model = convert(tiny_model(arch, init_std=0.15), fmt)
    if head_bits is not None:
        from otaro.head import quantize_head

        model = quantize_head(model, head_bits)
    checkpoint.save(model, root / f"ck-{arch}", tokenizer=tiny_tokenizer())
    return root / f"ck-{arch}"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    ck = _ckpt(root)
    out = {}
    for graph in ("fused", "traced"):
        out[graph] = root / graph
        export(ExportConfig(ck, out[graph], accuracy_level=1, validate_tokens=6, graph=graph))
    return ck, out


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_fused_graph_validates_and_is_the_fused_one(arts):
    _, out = arts
    man = read_manifest(out["fused"])
    assert man["graph"] == "fused" and read_manifest(out["traced"])["graph"] == "traced"
    res = man["validation"]["results"]
    assert [r["bits"] for r in res] == list(range(2, 9))
    assert all(r["passed"] and r["greedy_equal"] for r in res)
    assert max(r["max_abs_diff"] for r in res) < 1e-4  # exact level: summation order only
    fused, traced = _ops(out["fused"] / "model.onnx"), _ops(out["traced"] / "model.onnx")
    layers = len(man["layers"])
    assert fused["GroupQueryAttention"] == 2 and fused["SkipSimplifiedLayerNormalization"] >= 3
    # every linear (q, k and v included) keeps its own SEFP code
    sefp = [sum(v for k, v in c.items() if k.startswith(ops.SEFP_OP)) for c in (fused, traced)]
    assert sefp == [layers, layers]
    assert sum(fused.values()) * 2 < sum(traced.values())
    # only standard ops in the default domain: the ONNX checker passes (the rewrite's save ran it)
    assert "SimplifiedLayerNormalization" not in fused


def test_fused_and_traced_give_the_same_logits_at_every_bits(arts):
    _, out = arts
    got = {}
    for graph, art in out.items():
        rt = Runtime.load(art, threads=1, accuracy_level=1)
        for b in (2, 4, 8):
            rt.set_precision(b)
            got[(graph, b)] = rt.logits(PROMPTS[0])
    for b in (2, 4, 8):
        # same weights, same math; attention differs only in fp32 summation order
        np.testing.assert_allclose(got[("fused", b)], got[("traced", b)], atol=2e-4, rtol=0)


def test_right_padded_batches_decode_like_single_prompts(arts):
    _, out = arts
    rt = Runtime.load(out["fused"], threads=1, accuracy_level=1)
    assert rt.decoder.io.right_padding and not rt.decoder.io.has_position_ids
    for b in (8, 3):
        rt.set_precision(b)
        single = [rt.generate(p, max_new_tokens=6).token_ids for p in PROMPTS]
        batch = [g.token_ids for g in rt.generate(PROMPTS, max_new_tokens=6)]
        assert batch == single, b
    # and the padded rows really were padded on the right
    dec = rt.decoder
    bt = Batch(dec, PROMPTS, pad_id=0)
    assert bt.mask[1].tolist() == [1] * len(PROMPTS[1]) + [0] * (len(PROMPTS[2]) - len(PROMPTS[1]))


def test_left_padding_would_be_wrong_for_this_graph(arts):
    """Why the runtime pads right: GroupQueryAttention counts the real tokens from the front."""
    _, out = arts
    sess = ort.InferenceSession(str(out["fused"] / "model.onnx"), providers=["CPUExecutionProvider"])
    dec = Decoder(sess)
    short = PROMPTS[1]
    alone = dec.prompt_logits(short)[-1]
    width = len(PROMPTS[0])
    ids = np.array([[0] * (width - len(short)) + short], np.int64)
    mask = np.array([[0] * (width - len(short)) + [1] * len(short)], np.int64)
    left, _ = dec.forward(ids, mask, dec.empty_past(1))
    assert np.abs(left[0, -1] - alone).max() > 1e-2


def test_quantized_head_and_embedding_in_the_fused_graph(tmp_path):
    ck = _ckpt(tmp_path, head_bits=8)
    m = export(ExportConfig(ck, tmp_path / "art", accuracy_level=1, validate_tokens=4, graph="fused"))
    assert m["graph"] == "fused" and m["head"] is not None
    assert all(r["passed"] and r["greedy_equal"] for r in m["validation"]["results"])
    g = onnx.load(str(tmp_path / "art/model.onnx"), load_external_data=False).graph
    assert any(n.op_type.startswith(ops.GATHER_OP) for n in g.node)  # the embedding gathers SEFP codes
    # no float table left: the tied head's int8 code is stored once and gathered from
    assert not [i for i in g.initializer if sorted(i.dims) == [64, 320] and i.data_type == onnx.TensorProto.FLOAT]
    assert len([i for i in g.initializer if sorted(i.dims) == [64, 320]]) == 1


def test_auto_uses_the_trace_where_the_builder_does_not_apply(tmp_path):
    ck = _ckpt(tmp_path, arch="gpt_neox", fmt="ssfp-g16-trunc")
    m = export(ExportConfig(ck, tmp_path / "art", validate=False))
    assert m["graph"] == "traced"
    with pytest.raises(OtaroError, match="--graph fused supports llama"):
        export(ExportConfig(ck, tmp_path / "art2", validate=False, graph="fused"))
    assert not (tmp_path / "art2").exists()


def test_missing_builder_is_a_clear_error(tmp_path, monkeypatch):
    ck = _ckpt(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx_ir" else real(n, *a))
    with pytest.raises(OtaroError, match="onnx-ir"):
        export(ExportConfig(ck, tmp_path / "art", validate=False, graph="fused"))
    assert not (tmp_path / "art").exists()
    # auto quietly takes the trace instead
    assert export(ExportConfig(ck, tmp_path / "art3", validate=False))["graph"] == "traced"
    with pytest.raises(OtaroError, match="unknown graph"):
        export(ExportConfig(ck, tmp_path / "art4", validate=False, graph="fast"))


def test_in_place_kv_cache_matches_the_numpy_hand_off(arts, monkeypatch):
    """The fused graph's cache is updated in place (SharedKV, GroupQueryAttention's shared
    buffer): same logits as feeding the past in and reading the presents back, bit for bit,
    through a prefill, a multi-token extend, single steps, a batch and buffer growth. The same
    holds for the cache a GPU session keeps on its device: OrtValues that onnxruntime allocates
    (here on the CPU, the only device this test has), grown by way of the host."""
    from otaro.runtime.decoder import SharedKV

    _, out = arts
    sess = ort.InferenceSession(str(out["fused"] / "model.onnx"), providers=["CPUExecutionProvider"])
    shared, plain = Decoder(sess), Decoder(sess, shared_kv=False)
    on_device = Decoder(sess, kv_device=("cpu", 0))
    assert shared.shared_kv and not plain.shared_kv
    assert shared.kv_device is None  # a CPU session: numpy buffers onnxruntime writes through
    assert isinstance(shared.empty_past(1), SharedKV) and isinstance(plain.empty_past(1), dict)
    monkeypatch.setattr(SharedKV, "STEP", 8)  # grow every few steps: the copy on growth is exercised
    for dec in (shared, plain, on_device):
        dec.run = []
        ids = np.array([PROMPTS[2]], np.int64)
        past = dec.empty_past(1)
        logits, past = dec.forward(ids[:, :13], np.ones((1, 13), np.int64), past)  # prefill
        dec.run.append(logits)
        logits, past = dec.forward(ids[:, 13:], np.ones((1, ids.shape[1]), np.int64), past)  # extend by 8
        dec.run.append(logits)
        for step in range(12):  # past the capacity several times
            tok = np.array([[int(logits[0, -1].argmax())]], np.int64)
            total = ids.shape[1] + step + 1
            logits, past = dec.forward(tok, np.ones((1, total), np.int64), past)
            dec.run.append(logits)
        dec.past = past
    for a, b, c in zip(shared.run, plain.run, on_device.run):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)
    assert shared.past.capacity >= shared.past.length == ids.shape[1] + 12
    assert on_device.past.capacity == shared.past.capacity and not on_device.past.buffers
    for past in (shared.past, on_device.past):
        for name, arr in past.arrays().items():
            np.testing.assert_array_equal(arr, plain.past[name])
    # a right-padded batch, several steps
    got = {}
    for dec in (shared, plain, on_device):
        bt = Batch(dec, PROMPTS, pad_id=0)
        rows = [bt.prefill()]
        for _ in range(5):
            rows.append(bt.step(rows[-1].argmax(-1)))
        got[id(dec)] = rows
    for a, b, c in zip(got[id(shared)], got[id(plain)], got[id(on_device)]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)


@pytest.mark.parametrize("graph", ["fused", "traced"])
def test_logits_only_at_the_rows_asked_for(arts, graph):
    """The graphs the runtime builds take ``logit_rows``: the head runs on those rows of the
    hidden state only (generation asks for one per row). The logits there are the full run's,
    on the in-place cache (fused) and the numpy one (traced); a graph without the input (the
    exported file itself) is sliced after the run, with the same result."""
    from otaro.runtime.decoder import LOGIT_ROWS

    _, out = arts
    rt = Runtime.load(out[graph], accuracy_level=4, cache_bytes=0)
    dec = rt.decoder
    assert dec.io.has_logit_rows and LOGIT_ROWS in {i.name for i in dec.session.get_inputs()}
    exported = Decoder(ort.InferenceSession(str(out[graph] / "model.onnx"), providers=["CPUExecutionProvider"]))
    assert not exported.io.has_logit_rows
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]], np.int64)
    mask = np.ones_like(ids)
    full, _ = dec.forward(ids, mask, dec.empty_past(2))
    for rows in ([[0, 15], [7, 3]], [[15], [2]]):
        r = np.array(rows)
        got, _ = dec.forward(ids, mask, dec.empty_past(2), rows=r)
        # accuracy level 4: each row's activations are quantized on their own, so a row's
        # logits do not depend on which other rows run beside it: exact
        np.testing.assert_array_equal(got, np.take_along_axis(full, r[..., None], axis=1))
        ref, _ = exported.forward(ids, mask, exported.empty_past(2))
        sliced, _ = exported.forward(ids, mask, exported.empty_past(2), rows=r)
        np.testing.assert_array_equal(sliced, np.take_along_axis(ref, r[..., None], axis=1))
    with pytest.raises(ValueError, match="indices into the 16 new tokens"):
        dec.forward(ids, mask, dec.empty_past(2), rows=[[16], [0]])
    # generation asks for the last row only: the same tokens as from every row's logits
    x = np.array([PROMPTS[1]], np.int64)
    logits, past = dec.forward(x, np.ones_like(x), dec.empty_past(1))
    want = []
    for _ in range(6):
        want.append(int(logits[0, -1].argmax()))
        logits, past = dec.forward(np.array([[want[-1]]]), np.ones((1, x.shape[1] + len(want)), np.int64), past)
    assert dec.greedy(PROMPTS[1], 6) == want


def test_a_gpu_session_keeps_its_cache_on_its_device():
    """Which device the in-place cache lives on follows the session's first provider."""
    from otaro.runtime.decoder import session_kv_device

    class Fake:
        def __init__(self, providers, options):
            self.providers, self.options = providers, options

        def get_providers(self):
            return self.providers

        def get_provider_options(self):
            return self.options

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session_kv_device(Fake(cuda, {"CUDAExecutionProvider": {"device_id": "1"}})) == ("cuda", 1)
    assert session_kv_device(Fake(cuda, {})) == ("cuda", 0)
    assert session_kv_device(Fake(["CPUExecutionProvider"], {})) is None
    assert session_kv_device(object()) is None  # a stand-in without providers: host memory


def test_in_place_kv_cache_refuses_a_mismatched_step(arts):
    _, out = arts
    dec = Decoder(ort.InferenceSession(str(out["fused"] / "model.onnx"), providers=["CPUExecutionProvider"]))
    past = dec.empty_past(1)
    _, past = dec.forward(np.array([[3, 4, 5]], np.int64), np.ones((1, 3), np.int64), past)
    with pytest.raises(ValueError, match="holds 1 row"):  # a mask that skips a position
        dec.forward(np.array([[6]], np.int64), np.ones((1, 5), np.int64), past)
    traced = ort.InferenceSession(str(out["traced"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert not Decoder(traced).shared_kv
    with pytest.raises(ValueError, match="needs a GroupQueryAttention decoder"):
        Decoder(traced, shared_kv=True)


@pytest.mark.parametrize("graph", ["fused", "traced"])
def test_sibling_layers_run_as_one_matmulnbits_with_the_same_numbers(arts, graph):
    """q/k/v and gate/up read the same activation: the runtime stacks their packed weights
    along N into one MatMulNBits (a Concat of q/k/v disappears; elsewhere a Split hands the
    outputs back). Every output column is its own dot product: logits are bit-identical."""
    from concurrent.futures import ThreadPoolExecutor

    from otaro.runtime.backends import create_session
    from otaro.runtime.switch import build_model, sibling_groups

    _, out = arts
    rt = Runtime.load(out[graph], threads=1, accuracy_level=4)
    master = rt.master
    with ThreadPoolExecutor(2) as pool:
        for b, acc in ((4, 4), (2, 1), (8, 4)):
            p = master.uniform(b)
            plan = {n: (bits, rt.backend.container_for(master.fmt.code_bits(bits)))
                    for n, bits in zip(master.layers, p.bits)}
            groups = sibling_groups(master.proto.graph, master, plan)
            assert sorted(len(g) for g in groups) == [2, 2, 3, 3]  # per layer: gate/up, q/k/v
            models = {fs: build_model(master, p, rt.backend.container_for, acc, pool, fuse_siblings=fs) for fs in (0, 1)}
            ops_ = {fs: collections.Counter(n.op_type for n in onnx.load_from_string(m.model).graph.node)
                    for fs, m in models.items()}
            layers = len(master.layers)
            assert ops_[0]["MatMulNBits"] == layers and ops_[1]["MatMulNBits"] == layers - 6
            if graph == "fused":  # q/k/v feed the Concat GroupQueryAttention reads: it goes
                assert ops_[1]["Concat"] == ops_[0]["Concat"] - 2 and ops_[1]["Split"] == 2
            else:
                assert ops_[1]["Split"] == ops_[0]["Split"] + 4
            got = []
            for m in models.values():
                sess, keep = create_session(rt.backend, m.model, m.files, m.shared, threads=1)
                got.append(Decoder(sess).prompt_logits(PROMPTS[0]))
            np.testing.assert_array_equal(got[0], got[1])
