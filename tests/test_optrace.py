"""onnxruntime profiles summed by op type (otaro.runtime.optrace), and Runtime.load(profile=)."""

import json

import pytest

from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro import checkpoint
from otaro.errors import OtaroError
from otaro.export.artifact import ExportConfig, export
from otaro.modules import convert
from otaro.runtime import Runtime
from otaro.runtime.optrace import op_breakdown, read_trace


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(ts, dur, op, name="n"):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_breakdown_by_hand():
    events = [
        _run(0, 100), _node(10, 50, "MatMulNBits"),  # the prefill, skipped
        _run(200, 40), _node(201, 10, "MatMulNBits"), _node(215, 4, "Gather"), _node(220, 2, "Gather"),
        {"cat": "Node", "name": "x_fence_before", "ts": 221, "dur": 99},  # not a kernel time
        _run(300, 60), _node(301, 14, "MatMulNBits"), _node(320, 2, "Shape"),
        _node(500, 99, "MatMulNBits"),  # outside every run (session initialisation)
    ]
    b = op_breakdown(events, skip=1)
    assert b.runs == 2 and b.run_ms == pytest.approx(0.060) and b.nodes_per_run == 2.5
    assert b.kernel_ms == pytest.approx((16 + 16) / 2 / 1000)
    assert [(o.op, o.ms_per_run, o.nodes_per_run) for o in b.ops] == [
        ("MatMulNBits", pytest.approx(0.012), 1.0), ("Gather", pytest.approx(0.003), 1.0),
        ("Shape", pytest.approx(0.001), 0.5)]
    assert sum(o.share for o in b.ops) == pytest.approx(1.0)
    assert b.between_kernels_ms == pytest.approx(0.060 - 0.016)


def test_bad_profiles_are_clear_errors(tmp_path):
    with pytest.raises(OtaroError, match="no model run"):
        op_breakdown([_run(0, 1)], skip=1)
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(OtaroError, match="not an onnxruntime profile"):
        read_trace(bad)
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(OtaroError, match="JSON list"):
        read_trace(bad)


def test_runtime_profile_counts_every_decode_step(tmp_path):
    checkpoint.save(convert(tiny_model("llama", init_std=0.15), "sefp-g16-nearest"), tmp_path / "ck",
                    tokenizer=tiny_tokenizer())
    export(ExportConfig(tmp_path / "ck", tmp_path / "art", accuracy_level=1, validate=False))
    with pytest.raises(OtaroError, match="does not exist"):
        Runtime.load(tmp_path / "art", profile=tmp_path / "missing" / "p")
    plain = Runtime.load(tmp_path / "art")
    with pytest.raises(OtaroError, match="without profile"):
        plain.end_profiling()
    rt = Runtime.load(tmp_path / "art", bits=4, profile=tmp_path / "prof")
    g = rt.generate(list(range(3, 11)), max_new_tokens=5)
    files = rt.end_profiling()
    assert len(files) == 1 and files[0].parent == tmp_path and files[0].name.startswith("prof")
    b = op_breakdown(read_trace(files[0]), skip=1)  # the prefill left out
    # one run per generated token after the first (the prefill's logits give the first one)
    assert b.runs == len(g.token_ids) - 1
    assert "MatMulNBits" in {o.op for o in b.ops} and b.kernel_ms > 0 and b.nodes_per_run > 10
    assert rt.end_profiling() == []  # closed once; the session still runs
    assert rt.generate(list(range(3, 11)), max_new_tokens=2).token_ids
