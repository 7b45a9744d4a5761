"""The torch-free runtime (`otaro.runtime`) against the torch SEFP model, on tiny artifacts.

Artifacts are exported once per session in exact mode (accuracy_level 1: fp32 activations in
every MatMulNBits), so logits match torch to fp32 summation order and greedy tokens match
token for token, at every bit-width and per-layer precision.
"""

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from otaro import checkpoint
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import FormatError, OtaroError
from otaro.export import validate
from otaro.export.artifact import ExportConfig, export
from otaro.modules import convert
from otaro.runtime import Runtime, select_backend
from otaro.runtime.chat import ChatTemplate, ChatTemplateError
from otaro.runtime.switch import parse_precision

# One architecture per decode body of the SEFP function; phi3 also has fused qkv / gate_up.
ROUNDING = {"llama": "trunc", "phi3": "nearest", "mistral": "midpoint"}
PROMPT = list(range(3, 19))
NEW = 6
# Exact mode differs from torch only by fp32 summation order (~1e-6 on logits of size ~10);
# one quantization step of a wrong bit-width moves them by > 1e-2 (test_export checks that).
ATOL = 1e-4
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """arch -> (artifact folder, checkpoint folder); llama's tokenizer has a chat template."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"rt-{arch}")
            tok = tiny_tokenizer()
            if arch == "llama":
                tok.chat_template = TEMPLATE
            checkpoint.save(convert(tiny_model(arch, init_std=0.15), f"sefp-g16-{ROUNDING[arch]}"), root / "ck",
                            tokenizer=tok)
            export(ExportConfig(root / "ck", root / "art", accuracy_level=1, validate=False))
            cache[arch] = (root / "art", root / "ck")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def runtimes(artifacts):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = Runtime.load(artifacts(arch)[0], accuracy_level=1)
        return cache[arch]

    return get


def _tokens(g):
    """Runtime tokens, for comparison with torch's (which does not stop at end-of-sequence)."""
    return list(g.token_ids)


def _same_greedy(g, ref, eos):
    toks = _tokens(g)
    assert toks == ref[:len(toks)]
    assert len(toks) == len(ref) or toks[-1] in eos


@pytest.mark.parametrize("arch", sorted(ROUNDING))
def test_every_bit_width_matches_torch(artifacts, runtimes, arch):
    rt = runtimes(arch)
    model = checkpoint.load(artifacts(arch)[1])
    seen = set()
    for b in range(2, 9):
        model.set_precision(b)
        ref_logits, ref_tokens = validate.torch_reference(model, PROMPT, NEW)
        np.testing.assert_allclose(rt.logits(PROMPT, bits=b), ref_logits, rtol=0, atol=ATOL)
        _same_greedy(rt.generate(PROMPT, max_new_tokens=NEW, bits=b), ref_tokens, rt.eos_ids)
        seen.add(tuple(ref_tokens))
    assert len(seen) > 1  # the continuations differ across bit-widths: the comparison has teeth


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: midpoint at 8 keeps a SefpMatMul node
def test_per_layer_precision_matches_torch(artifacts, runtimes, arch):
    rt = runtimes(arch)
    spec = {"*": 3, "layers.0.*": 8, "layers.1.mlp.*": 5}
    model = checkpoint.load(artifacts(arch)[1])
    model.set_precision(spec)
    ref_logits, ref_tokens = validate.torch_reference(model, PROMPT, NEW)
    np.testing.assert_allclose(rt.logits(PROMPT, bits=spec), ref_logits, rtol=0, atol=ATOL)
    _same_greedy(rt.generate(PROMPT, max_new_tokens=NEW, bits=spec), ref_tokens, rt.eos_ids)
    assert parse_precision("*=3,layers.0.*=8,layers.1.mlp.*=5") == spec and parse_precision(" 4 ") == 4


def test_switching_back_is_bit_identical_and_reported(artifacts):
    art = artifacts("llama")[0]
    rt = Runtime.load(art, accuracy_level=1, cache_bytes=0)  # only the active precision stays warm
    first = rt.last_switch
    assert first.spec == "8" and not first.cached and first.seconds >= first.session_seconds > 0
    assert first.derive_seconds > 0 and first.extra_bytes >= 0
    at8 = rt.logits(PROMPT)
    r3 = rt.set_precision(3)
    assert r3 == rt.last_switch and r3.spec == "3" and not r3.cached
    assert not np.array_equal(rt.logits(PROMPT), at8)
    r8 = rt.set_precision(8)
    assert not r8.cached  # evicted under a zero budget: rebuilt from the master, not re-read
    assert np.array_equal(rt.logits(PROMPT), at8)

    rt = Runtime.load(art, accuracy_level=1)  # default budget: both stay warm
    built = rt.set_precision(3)
    rt.set_precision(8)
    again = rt.set_precision(3)
    assert again.cached and not built.cached and again.seconds < built.seconds and again.extra_bytes == 0
    rt.set_precision(8)
    assert np.array_equal(rt.logits(PROMPT), at8)
    with rt.precision(2) as r:
        assert r.spec == "2" and rt.active_precision.uniform == 2
    assert rt.active_precision.uniform == 8 and np.array_equal(rt.logits(PROMPT), at8)


def test_session_cache_is_lru_within_its_budget():
    from otaro.runtime.switch import Entry, Precision, SessionCache

    built = []

    def build(bits):
        built.append(bits[0])
        return Entry(bits, None, cost=10**6), 0.0, 0.0

    cache = SessionCache(2_500_000, build)  # two warm precisions besides the active one
    get = lambda b, pin=False: cache.get(Precision((b,), str(b)), pin=pin)[1]  # noqa: E731
    get(8, pin=True)
    for b in (2, 3, 4):
        get(b)
    assert [k[0] for k in cache.keys] == [8, 3, 4]  # 2 was least recently used
    assert get(3).cached and not get(5).cached
    assert [k[0] for k in cache.keys] == [8, 3, 5]  # the hit on 3 kept it; 4 went
    get(5, pin=True)  # the active one is never evicted, and no longer counts against the budget
    assert [k[0] for k in cache.keys] == [8, 3, 5]
    assert built == [8, 2, 3, 4, 5]


def test_concurrent_requests_keep_their_own_precision(runtimes):
    rt = runtimes("llama")
    prompts = [PROMPT, PROMPT[:9], PROMPT[4:]]
    jobs = [(p, b) for p in prompts for b in (2, 3, 5, 8)]
    expected = [rt.generate(p, max_new_tokens=NEW, bits=b).token_ids for p, b in jobs]
    done = threading.Event()

    def switcher():  # the default precision changes under the running requests
        while not done.is_set():
            for b in (4, 8):
                rt.set_precision(b)

    t = threading.Thread(target=switcher)
    t.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda j: rt.generate(j[0], max_new_tokens=NEW, bits=j[1]).token_ids, jobs))
    finally:
        done.set()
        t.join()
    assert got == expected
    # A request without bits keeps the session it started with, whatever happens meanwhile.
    rt.set_precision(8)
    want = rt.generate("The quick brown fox", max_new_tokens=8).text
    stream = rt.stream("The quick brown fox", max_new_tokens=8)
    chunks = iter(stream)
    head = next(chunks)
    rt.set_precision(2)
    assert head + "".join(chunks) == want and stream.result.precision == "8"
    rt.set_precision(8)


def test_sampling_stop_strings_streaming_and_batches(runtimes):
    rt = runtimes("llama")
    greedy = rt.generate("The quick brown fox", max_new_tokens=12)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 12
    # top-k 1 is greedy whatever the temperature
    assert rt.generate("The quick brown fox", max_new_tokens=12, temperature=1.5, top_k=1).token_ids == greedy.token_ids
    opts = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50)
    runs = {s: rt.generate("The quick brown fox", seed=s, **opts).token_ids for s in range(4)}
    assert rt.generate("The quick brown fox", seed=2, **opts).token_ids == runs[2]
    assert len(set(runs.values())) > 1
    # stop strings: the text ends before the first occurrence
    stop = greedy.text[4:7]
    cut = rt.generate("The quick brown fox", max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.index(stop)]
    # streaming gives the same text, also when a stop string is held back across chunks
    for kw in ({}, {"stop": (stop,)}, {"temperature": 0.8, "seed": 3}):
        stream = rt.stream("The quick brown fox", max_new_tokens=12, **kw)
        text = "".join(stream)
        g = rt.generate("The quick brown fox", max_new_tokens=12, **kw)
        assert text == g.text == stream.result.text and stream.result.token_ids == g.token_ids
    # a batch of different lengths (left-padded) equals each prompt alone
    prompts = ["The quick brown fox", "A model", PROMPT, "The weather was fine, and the river ran"]
    batch = rt.generate(prompts, max_new_tokens=10)
    alone = [rt.generate(p, max_new_tokens=10) for p in prompts]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert [g.text for g in batch] == [g.text for g in alone]
    assert batch[1].prompt_tokens < batch[0].prompt_tokens


def test_chat_template(runtimes):
    rt = runtimes("llama")
    messages = [{"role": "user", "content": "Hello"}]
    text = rt.apply_chat_template(messages)
    assert text == "<|user|>Hello<|endoftext|><|assistant|>"
    g = rt.generate(messages, max_new_tokens=4)
    assert g.prompt_tokens == len(rt.tokenizer.encode(text, add_special_tokens=False).ids)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        runtimes("phi3").generate(messages)
    with pytest.raises(ChatTemplateError, match="role"):
        rt.generate([{"content": "no role"}])
    bad = ChatTemplate("{{ raise_exception('only user turns') }}", {})
    with pytest.raises(ChatTemplateError, match="only user turns"):
        bad.render(messages)


def _copy(art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


def test_bad_input_is_a_clear_error_and_the_runtime_stays_usable(artifacts, runtimes, tmp_path):
    rt = runtimes("llama")
    before = rt.generate("The quick brown fox", max_new_tokens=6).token_ids
    with pytest.raises(FormatError, match="bit-width 9 is not supported"):
        rt.set_precision(9)
    with pytest.raises(FormatError, match="matches no quantized layer"):
        rt.generate("The quick", bits={"layers.7.*": 4})
    with pytest.raises(FormatError, match="cannot read precision"):
        parse_precision("four")
    with pytest.raises(OtaroError, match="context is 256 tokens"):
        rt.generate(list(range(3, 259)))
    with pytest.raises(OtaroError, match="temperature"):
        rt.generate("The quick", temperature=-1)
    with pytest.raises(OtaroError, match="top_p"):
        rt.generate("The quick", temperature=1, top_p=0)
    with pytest.raises(OtaroError, match="a batch is a non-empty list"):
        rt.generate([])
    assert rt.active_precision.uniform == 8
    assert rt.generate("The quick brown fox", max_new_tokens=6).token_ids == before

    art = artifacts("llama")[0]
    foreign = _copy(art, tmp_path / "v")
    m = json.loads((foreign / "otaro_artifact.json").read_text())
    (foreign / "otaro_artifact.json").write_text(json.dumps({**m, "otaro_artifact": 99}))
    with pytest.raises(OtaroError, match="format version 99 is not supported"):
        Runtime.load(foreign)
    partial = _copy(art, tmp_path / "p")
    (partial / "otaro_artifact.json").write_text(json.dumps({**m, "bits": [4, 8], "default_bits": 8}))
    rt2 = Runtime.load(partial, accuracy_level=1)
    with pytest.raises(FormatError, match="choose one of 4,8"):
        rt2.set_precision(3)
    assert rt2.generate("The quick brown fox", max_new_tokens=6).token_ids == before
    missing = _copy(art, tmp_path / "m")
    (missing / "model.onnx_data").unlink()
    with pytest.raises(OtaroError, match="model.onnx_data is missing"):
        Runtime.load(missing)
    corrupt = _copy(art, tmp_path / "c")
    data = corrupt / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(OtaroError, match="corrupt or truncated"):
        Runtime.load(corrupt)
    with pytest.raises(OtaroError, match="corrupt or truncated"):
        Runtime.load(corrupt, verify=False)  # sizes are checked even without sha256
    with pytest.raises(OtaroError, match="does not exist"):
        Runtime.load(tmp_path / "nowhere")


def test_select_backend_is_a_pure_choice():
    cpu = select_backend("cpu", ["CPUExecutionProvider"], accuracy_level=4)
    assert cpu.providers == ("CPUExecutionProvider",) and cpu.containers == (2, 4, 8) and cpu.accuracy_level == 4
    assert [cpu.container_for(c) for c in (2, 3, 4, 5, 8, 9)] == [2, 4, 4, 8, 8, None]
    with pytest.raises(OtaroError, match="CUDAExecutionProvider.*onnxruntime-gpu.*has only: CPUExecutionProvider"):
        select_backend("cuda", ["CPUExecutionProvider"])
    cuda = select_backend("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], accuracy_level=1)
    assert cuda.providers == ("CUDAExecutionProvider", "CPUExecutionProvider") and cuda.container_for(2) == 4
    with pytest.raises(OtaroError, match="device 'tpu' is not supported"):
        select_backend("tpu", ["CPUExecutionProvider"])
    with pytest.raises(OtaroError, match="accuracy level 7"):
        select_backend("cpu", ["CPUExecutionProvider"], accuracy_level=7)


def test_a_device_onnxruntime_could_not_start_is_an_error_not_a_cpu_run():
    """onnxruntime-gpu without its CUDA libraries falls back to the CPU provider on its own;
    the runtime says so instead of running a `device="cuda"` request on the CPU."""
    from otaro.runtime.backends import check_provider

    cuda = select_backend("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_provider(cuda, ["CUDAExecutionProvider", "CPUExecutionProvider"])  # started: nothing to say
    with pytest.raises(OtaroError, match="could not start CUDAExecutionProvider.*fell back to CPUExecutionProvider"):
        check_provider(cuda, ["CPUExecutionProvider"])
    check_provider(select_backend("cpu", ["CPUExecutionProvider"]), ["CPUExecutionProvider"])


def test_tied_head_transpose_before_the_layers_loads_and_runs(artifacts, runtimes, tmp_path):
    """Regression: the runtime removes the tied head's Transpose; with that node *before* the
    SEFP layers (Gemma-style graphs) the recorded node indices shifted and build_model raised
    IndexError. Same logits whichever position the node has."""
    import hashlib

    import onnx

    art = _copy(artifacts("llama")[0], tmp_path)
    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    nodes = list(proto.graph.node)
    inits = {t.name for t in proto.graph.initializer}
    heads = [i for i, n in enumerate(nodes) if n.op_type == "Transpose" and n.input[0] in inits]
    assert heads, "the tiny llama export has a tied-head Transpose"
    moved = [nodes[heads[-1]]] + [n for i, n in enumerate(nodes) if i != heads[-1]]
    del proto.graph.node[:]
    proto.graph.node.extend(moved)
    (art / "model.onnx").write_bytes(proto.SerializeToString())
    m = json.loads((art / "otaro_artifact.json").read_text())
    data = (art / "model.onnx").read_bytes()
    for files in (m["model"]["files"], m["files"]):
        if "model.onnx" in files:
            files["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (art / "otaro_artifact.json").write_text(json.dumps(m))
    rt = Runtime.load(art, accuracy_level=1)
    for b in (8, 3):
        np.testing.assert_allclose(rt.logits(PROMPT, bits=b), runtimes("llama").logits(PROMPT, bits=b), atol=ATOL)


def test_prewarmed_precisions_switch_without_building(artifacts):
    art, _ = artifacts("llama")
    rt = Runtime.load(art, warm=[4, {"*": 2, "layers.0.*": 8}])
    assert rt.active_precision.uniform == 8
    for spec in (4, {"*": 2, "layers.0.*": 8}):
        assert rt.set_precision(spec).cached  # a cache lookup, no session built
    with pytest.raises(FormatError):
        Runtime.load(art, warm=[9])
    with pytest.raises(OtaroError, match="cannot keep the warm precision"):
        Runtime.load(art, warm=4, cache_bytes=0)


def test_passive_threads_give_the_same_logits(artifacts):
    art, _ = artifacts("llama")
    spin, passive = Runtime.load(art, threads=2), Runtime.load(art, threads=2, spin=False)
    assert spin.backend.spin and not passive.backend.spin
    from otaro.runtime.backends import session_options

    assert session_options(passive.backend, 2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_array_equal(spin.logits(PROMPT), passive.logits(PROMPT))


def test_lut_kernel_only_at_the_int8_activation_level():
    """accuracy_level 4 turns on MLAS's lookup-table kernel for 2-bit MatMulNBits (it builds int8
    tables of activation sums); the exact levels keep fp32 activations and never ask for it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from otaro.formats import onnx_ops as ops
    from otaro.runtime.backends import LUT_KEY, session_options

    fast = select_backend("cpu", ["CPUExecutionProvider"], accuracy_level=4)
    exact = select_backend("cpu", ["CPUExecutionProvider"], accuracy_level=1)
    assert session_options(fast).get_session_config_entry(LUT_KEY) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # never set
        session_options(exact).get_session_config_entry(LUT_KEY)
    # What the kernel computes, where it applies (2 bits, N a multiple of 128): the product up to
    # the int8 rounding of the activation tables. 0.02 of the largest output: measured ~0.006
    # on this seed; int8 tables of 64-wide groups bound it near 1/127 per group.
    rng = np.random.default_rng(0)
    K, N, G = 256, 256, 64
    codes = rng.integers(0, 4, (N, K)).astype(np.uint8)
    scales = rng.uniform(0.005, 0.02, (N, K // G)).astype(np.float32)
    c = codes.reshape(N, K // G, G // 4, 4)
    B = (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).astype(np.uint8)
    W = ((codes.reshape(N, K // G, G).astype(np.float32) - 2) * scales[..., None]).reshape(N, K)
    node = ops.matmulnbits_node("A", "B", "S", "Y", "mm", K=K, N=N, bits=2, block_size=G, accuracy_level=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                          [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales.reshape(-1), "S")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ops.MS_DOMAIN, 1)])
    A = rng.standard_normal((1, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), session_options(fast),
                             providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    ref = A @ W.T
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_freed_heap_pages_go_back_to_the_os():
    """What the runtime calls after a switch. onnxruntime builds a session with temporaries
    allocated on its threads; glibc keeps what a thread's arena frees in the process. Reproduced
    here with malloc/free on a thread: ~94 MiB stay resident after free, and go on trim. In a
    fresh process: whether free() already trims depends on the heap's history (where small
    survivors land, thresholds glibc raised for earlier big frees), which a test run shares."""
    code = r"""
import ctypes, ctypes.util, json, threading
from otaro.runtime.switch import release_freed_memory, rss_bytes
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "malloc_trim"):
    print(json.dumps(None)); raise SystemExit
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n, size, keep = 1500, 64 << 10, []
def build():  # a session build's shape: big temporaries, small survivors between them
    temps = []
    for _ in range(n):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        temps.append(p)
        keep.append(libc.malloc(64))
    for p in temps:
        libc.free(p)
t = threading.Thread(target=build)
t.start()
t.join()
before = rss_bytes()
release_freed_memory()
print(json.dumps([before, rss_bytes(), n * size]))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=120).stdout)
    if out is None:
        pytest.skip("not glibc")
    before, after, freed = out
    assert before - after > 0.5 * freed  # most of the freed 94 MiB was still resident
