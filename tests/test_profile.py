"""`otaro profile`: the profiler on a tiny artifact, the roofline arithmetic, every device profile.

No timing thresholds: the tests check that every number is there, has the right shape and
obeys the arithmetic, not how fast this machine is.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from otaro.cli import cli
from otaro.devices import (DeviceError, DeviceProfile, Spec, get_device, known_devices, load_profile, parse_profile,
                           save_profile, shipped_dir)
from otaro.errors import OtaroError
from otaro.profiling.measure import ProfileConfig, predict_only, run_profile, stats, switch_walk
from otaro.profiling.report import ReportError, render, validate_report, write
from otaro.profiling.roofline import FIT_FRACTION, ModelShape, QLayer, predict
from otaro.runtime.backends import BACKENDS

SMALL = dict(prompt_len=8, gen_len=4, repeats=2, warmup=1, bandwidth_bytes=4 << 20, bandwidth_repeats=1)
CPU = lambda code: next((c for c in (2, 4, 8) if c >= code), None)  # noqa: E731  (onnxruntime-cpu containers)


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny llama artifact (every b = 2..8) with one fixed-precision variant (b = 4)."""
    from otaro import checkpoint
    from otaro.arch.tiny import tiny_model, tiny_tokenizer
    from otaro.export.artifact import ExportConfig, export
    from otaro.modules import convert

    root = tmp_path_factory.mktemp("profile")
    checkpoint.save(convert(tiny_model("llama", init_std=0.15), "sefp-g16-trunc"), root / "ck",
                    tokenizer=tiny_tokenizer())
    export(ExportConfig(root / "ck", root / "art", variants=("sefp:4",), validate=False))
    return root / "art"


@pytest.fixture(autouse=True)
def _own_devices_dir(tmp_path, monkeypatch):
    """Saved device profiles go to a per-test folder, never the user's; no llama-bench."""
    monkeypatch.setenv("OTARO_DEVICES_DIR", str(tmp_path / "devices"))
    monkeypatch.delenv("LLAMA_BENCH", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                               if not (Path(p) / "llama-bench").exists()))


# --------------------------------------------------------------------------- the roofline, by hand


def _shape(**kw):
    base = dict(layers=(QLayer("a", 128, 64), QLayer("b", 100, 32)), group_size=32, extra_code_bits=0,
                bits=tuple(range(2, 9)), float_read_bytes=1000, float_matmul_params=200, gather_row_bytes=256,
                float_stored_bytes=5000, kv_bytes_per_position=100, n_layers=2, attn_dim=16, master_bytes=20000)
    base.update(kw)
    return ModelShape(**base)


def test_bytes_per_token_by_hand():
    s = _shape()
    # b=4, container 4. a: 4 blocks of 32 along K=128, N=64 -> codes 64*4*32*4/8 = 4096, scales 64*4*4 = 1024.
    # b: K=100 -> ceil(100/32) = 4 blocks (the last one padded), N=32 -> codes 2048, scales 512.
    assert s.quantized_bytes(4, CPU) == {"codes": 4096 + 2048, "scales": 1024 + 512, "folded": 0}
    assert s.quantized_bytes(3, CPU) == s.quantized_bytes(4, CPU)  # b=3 rides in the 4-bit container
    assert s.quantized_bytes(2, CPU) == {"codes": 2048 + 1024, "scales": 1536, "folded": 0}
    assert s.quantized_bytes(5, CPU) == s.quantized_bytes(8, CPU) == {"codes": 8192 + 4096, "scales": 1536, "folded": 0}
    # midpoint at 8 needs a 9-bit code: no container, the weights are folded to fp32 (4 bytes each)
    assert _shape(extra_code_bits=1).quantized_bytes(8, CPU) == {"codes": 0, "scales": 0,
                                                                  "folded": 4 * (128 * 64 + 100 * 32)}
    # CUDA containers are 4/8: b=2 reads the 4-bit container there
    cuda = lambda code: next((c for c in BACKENDS["onnxruntime-cuda"].containers if c >= code), None)  # noqa: E731
    assert s.quantized_bytes(2, cuda) == s.quantized_bytes(4, CPU)
    # a decoded token at 12 positions of context: weights + float tensors + one embedding row + KV
    b = s.decode_bytes(4, CPU, positions=12)
    assert b == {"codes": 6144, "scales": 1536, "folded": 0, "float": 1000, "gather": 256, "kv": 1200, "total": 10136}


def test_prediction_by_hand():
    s = _shape()
    # prompt 10, 5 generated: the decode steps see 10..14 tokens before them, mean 12
    p = predict(s, 4, CPU, bandwidth_bytes_per_s=1e6, peak_ops_per_s=None, prompt_len=10, gen_len=5)
    assert p.bytes_per_token["total"] == 10136
    assert p.decode_tps == pytest.approx(1e6 / 10136) and p.bound == "memory" and p.prefill_s is None
    assert p.container_bits == 4 and p.fits is None
    # compute bound: 2 FLOPs per weight (11392 quantized + 200 head) + 4 * layers * attn_dim * positions
    flops = 2 * (128 * 64 + 100 * 32 + 200) + 4 * 2 * 16 * 12
    p = predict(s, 4, CPU, 1e12, peak_ops_per_s=1e6, prompt_len=10, gen_len=5)
    assert p.compute_bound_tps == pytest.approx(1e6 / flops) and p.bound == "compute"
    assert p.decode_tps == pytest.approx(1e6 / flops)
    # prefill: max(FLOPs / peak, weight bytes / bandwidth); FLOPs = 2 * params * T + 2 * L * d * T^2
    pf = 2 * (11392 + 200) * 10 + 2 * 2 * 16 * 100
    assert p.prefill_s == pytest.approx(max(pf / 1e6, (10136 - 1200) / 1e12))
    # memory: runtime = master + packed + KV at prompt + generated tokens; fixed = packed + floats + KV
    fp = s.footprint(4, CPU, context=15)
    assert fp == {"runtime": 20000 + 7680 + 1500, "fixed": 7680 + 5000 + 1500, "kv": 1500, "packed": 7680}
    assert predict(s, 4, CPU, 1e6, None, 10, 5, memory_bytes=int(29180 / FIT_FRACTION) + 1).fits
    assert not predict(s, 4, CPU, 1e6, None, 10, 5, memory_bytes=29180).fits


def test_shape_read_from_the_artifact(artifact):
    m = json.loads((artifact / "otaro_artifact.json").read_text())
    s = ModelShape.from_artifact(artifact)
    for b in m["bits"]:  # the exporter's own per-precision sizes (CPU containers) agree
        q = s.quantized_bytes(b, CPU)
        assert q["codes"] + q["scales"] == m["precisions"][str(b)]["weight_bytes"]
    # tiny llama: vocab 320, hidden 64, 2 layers, 2 KV heads of 16, 4 query heads, tied head
    assert s.kv_bytes_per_position == 2 * 2 * 2 * 16 * 4 and s.n_layers == 2 and s.attn_dim == 64
    assert s.float_read_bytes >= 320 * 64 * 4  # the head (a Transpose of the embedding) is read in full
    # the fused graph (GroupQueryAttention) also reads one row of its cos and sin caches (head_dim / 2
    # floats each) per position; they are not weights, so they add no matmul parameters
    rope_rows = 2 * (16 // 2) * 4 if m["graph"] == "fused" else 0
    assert s.float_matmul_params == 320 * 64 and s.gather_row_bytes == 64 * 4 + rope_rows
    assert s.master_bytes == (artifact / "model.onnx_data").stat().st_size


def test_switch_walk_takes_every_ordered_pair_once():
    for bits in ([4], [2, 8], [2, 3, 4, 6, 8]):
        w = switch_walk(bits)
        pairs = list(zip(w, w[1:]))
        assert sorted(pairs) == sorted((a, b) for a in bits for b in bits if a != b)
        assert w[0] == bits[0]
    from otaro.profiling.measure import decode_fit

    rows = [{"bytes_per_token": {"total": x}, "decode_tps": {"median": 1 / (x / 2e9 + 1e-3)}} for x in (1e6, 2e6, 4e6)]
    fit = decode_fit(rows)  # seconds per token = bytes / 2 GB/s + 1 ms, recovered exactly
    assert fit["bandwidth_gbs"] == pytest.approx(2.0) and fit["overhead_s"] == pytest.approx(1e-3)
    assert fit["r2"] == pytest.approx(1.0) and decode_fit(rows[:1]) is None
    s = stats([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["spread"] == 1.0


# --------------------------------------------------------------------------- the profiler


def test_profile_report_is_complete_and_schema_checked(artifact, tmp_path):
    cfg = ProfileConfig(artifact, bits=(2, 4, 8), predict=("raspberry-pi-5",), work_dir=tmp_path / "files", **SMALL)
    r = run_profile(cfg, show_progress=False)
    validate_report(r)
    assert r["mode"] == "measured" and [row["bits"] for row in r["rows"]] == [2, 4, 8]
    for row in r["rows"]:
        assert not row["switch_cached"] and row["switch_s"] > 0  # every bit-width was built by a cold switch
        assert len(row["decode_tps"]["values"]) == 2 and row["decode_tps"]["min"] <= row["decode_tps"]["median"]
        assert row["container_bits"] == row["bits"]
        assert row["roofline_tps"] == pytest.approx(r["bandwidth"]["read_gbs"] * 1e9 / row["bytes_per_token"]["total"])
        assert row["prediction_error"] is not None and row["predicted_decode_tps"] > 0
        if sys.platform == "linux":
            assert row["peak_rss_bytes"] >= row["rss_bytes"] > 0
    # switch matrix: every off-diagonal pair, cold (rebuilt) and warm (cached)
    sw = r["switch"]
    n = len(sw["bits"])
    assert len(sw["cold_detail"]) == n * (n - 1) and not any(d["cached"] for d in sw["cold_detail"])
    for i in range(n):
        for j in range(n):
            assert (sw["cold_s"][i][j] is None) == (sw["warm_s"][i][j] is None) == (i == j)
    # competitors: a per-bit file for every precision the artifact carries (the variant for b=4)
    files = {f["bits"]: f for f in r["competitors"]["files"] if f["kind"] == "per-bit SEFP file"}
    assert sorted(files) == list(range(2, 9)) and files[4]["source"] == "variant sefp-b4"
    assert all("load_warm_s" in files[b] for b in (2, 4, 8)) and "load_warm_s" not in files[3]
    assert (tmp_path / "files" / "sefp-b2" / "model.onnx").is_file()
    assert r["competitors"]["disk"]["ratio"] > 1
    assert r["competitors"]["llama_bench"]["status"] == "skipped"
    assert [p["device"] for p in r["predictions"]] == ["raspberry-pi-5"] and r["beside"]["device"] == "this-machine"
    text = render(r)
    assert "Predicted" in text and "llama-bench: skipped" in text and "b = 3" not in text
    j, png = write(r, tmp_path / "out")
    assert json.loads(j.read_text())["rows"][0]["bits"] == 2 and png.stat().st_size > 1000
    bad = dict(r, rows=[dict(r["rows"][0], decode_tps="fast")])
    with pytest.raises(ReportError, match="decode_tps"):
        validate_report(bad)


def test_the_per_bit_file_runs_like_the_runtime(artifact, tmp_path):
    """The competitor's file is the runtime's model at that b, on disk: same logits."""
    import numpy as np
    import onnxruntime as ort

    from otaro.profiling.competitors import write_fixed_model
    from otaro.runtime import Runtime
    from otaro.runtime.decoder import Decoder

    rt = Runtime.load(artifact, bits=3)
    path = write_fixed_model(rt.master, 3, rt.backend, tmp_path / "b3")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(rt.backend.accuracy_level))
    dec = Decoder(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    ids = list(range(3, 12))
    np.testing.assert_array_equal(dec.prompt_logits(ids), rt.logits(ids))
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph  # the tied head is a Transpose again: stored once
    assert any(n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight" for n in g.node)
    assert not [t for t in g.initializer if list(t.dims) == [64, 320]]


def test_single_bit_width_without_extras(artifact):
    cfg = ProfileConfig(artifact, bits=(3,), measure_bandwidth=False, switch_matrix=False, competitors=False, **SMALL)
    r = validate_report(run_profile(cfg, show_progress=False))
    row = r["rows"][0]
    assert row["bits"] == 3 and row["container_bits"] == 4 and not row["switch_cached"] and row["switch_s"] > 0
    assert r["bandwidth"] is None and r["beside"] is None and row["roofline_tps"] is None
    assert r["switch"] is None and r["competitors"] is None


def test_predict_only_report(artifact, tmp_path):
    r = validate_report(predict_only(artifact, ["all"], (2, 3, 4, 8), 16, 8))
    assert r["mode"] == "predicted" and {p["device"] for p in r["predictions"]} == set(known_devices())
    h100 = next(p for p in r["predictions"] if p["device"] == "h100-sxm")
    assert h100["backend"] == "onnxruntime-cuda" and [row["container_bits"] for row in h100["rows"]] == [4, 4, 4, 8]
    assert all(row["fits"] for row in h100["rows"])
    assert any("the 4-bit MatMulNBits container" in n for n in r["notes"])
    write(r, tmp_path)
    assert "**Predicted**" in render(r)


def test_fake_llama_bench_is_run_and_parsed(tmp_path, monkeypatch):
    from otaro.profiling.competitors import run_llama_bench

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    out = [{"model_type": "llama 135M Q4_1", "model_size": 104, "n_prompt": 8, "n_gen": 0, "avg_ts": 900.0,
            "stddev_ts": 9.0, "n_threads": 2, "build_commit": "abc"},
           {"model_type": "llama 135M Q4_1", "model_size": 104, "n_prompt": 0, "n_gen": 4, "avg_ts": 80.0,
            "stddev_ts": 1.0, "n_threads": 2, "build_commit": "abc"}]
    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!{sys.executable}\nimport sys\nassert '-o' in sys.argv and 'json' in sys.argv\n"
                   f"print({json.dumps(json.dumps(out))})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    assert run_llama_bench([gguf], 8, 4, 1, 2)["status"] == "skipped"  # not on PATH, no $LLAMA_BENCH
    monkeypatch.setenv("LLAMA_BENCH", str(exe))
    assert "no GGUF" in run_llama_bench([], 8, 4, 1, 2)["note"]
    r = run_llama_bench([gguf], 8, 4, 1, 2)
    assert r["status"] == "ran" and r["rows"][0]["decode_tps"] == 80.0 and r["rows"][0]["prefill_tps"] == 900.0
    assert r["rows"][0]["disk_bytes"] == 104
    monkeypatch.setenv("LLAMA_BENCH", str(tmp_path / "missing"))
    assert "does not name an executable" in run_llama_bench([gguf], 8, 4, 1, 2)["note"]


# --------------------------------------------------------------------------- device profiles

SHIPPED = sorted(p.name for p in shipped_dir().glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_device_profile_validates(name):
    p = load_profile(shipped_dir() / name)
    assert p.name == Path(name).stem and p.preferred_backend in BACKENDS
    specs = [p.memory_bandwidth_gbs, p.memory_gib, *p.compute_tops.values()]
    assert all(isinstance(s, Spec) and s.value > 0 and len(s.source) >= 8 for s in specs)
    assert json.loads((shipped_dir() / name).read_text()) == p.to_json()  # nothing in the file is ignored
    assert parse_profile(p.to_json()) == p


def test_device_profiles_cover_the_devices_the_project_names():
    devices = known_devices()
    assert set(SHIPPED) == {f"{n}.json" for n in devices}  # every profile is a tested file (and vice versa)
    for needle in ("h100", "h200", "rtx-4090", "jetson", "macbook", "snapdragon", "raspberry-pi-5", "x86-laptop",
                   "x86-server"):
        assert any(needle in n for n in devices), needle
    measured = [p for p in devices.values() if p.measured is not None]
    assert measured and all(p.measured.date[:2] == "20" for p in measured)  # this machine, measured, dated


def test_bad_device_profiles_are_refused(tmp_path):
    good = get_device("h100-sxm").to_json()
    for change, msg in ((lambda d: d.pop("memory_gib"), "memory_gib"),
                        (lambda d: d["memory_bandwidth_gbs"].pop("source"), "source"),
                        (lambda d: d["memory_bandwidth_gbs"].update(value=-1), "positive"),
                        (lambda d: d.update(preferred_backend="tpu"), "preferred_backend"),
                        (lambda d: d.update(kind="phone"), "kind"),
                        (lambda d: d["compute_tops"].update(fp64={"value": 1, "source": "a spec sheet"}), "fp64"),
                        (lambda d: d.update(extra=1), "unknown field")):
        d = json.loads(json.dumps(good))
        change(d)
        with pytest.raises(DeviceError, match=msg):
            parse_profile(d)
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "h100-sxm.json").write_text(json.dumps(good))
    with pytest.raises(DeviceError, match="defined twice"):
        known_devices()


def test_unknown_device_lists_the_known_ones(artifact):
    with pytest.raises(DeviceError) as e:
        get_device("h1000")
    assert "h100-sxm" in str(e.value) and "raspberry-pi-5" in str(e.value)
    res = invoke("profile", artifact, "--predict", "h1000")
    assert res.exit_code == 1 and "unknown device 'h1000'" in res.output and "h100-sxm" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_bad_requests_are_one_line_errors(artifact, tmp_path):
    # bit-widths the artifact lacks: a copy whose manifest carries 2, 4 and 8 only
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    m = json.loads((art / "otaro_artifact.json").read_text())
    m["bits"] = [2, 4, 8]
    (art / "otaro_artifact.json").write_text(json.dumps(m))
    for args, msg in (((art, "--bits", "3,4"), "has no bit-width 3: it carries 2,4,8"),
                      ((artifact, "--backend", "onnxruntime-cuda", "--bits", "4"), "CUDAExecutionProvider"),
                      ((artifact, "--backend", "tpu"), "unknown backend 'tpu'"),
                      ((artifact, "--prompt-len", 250, "--gen-len", 10), "exceeds the model's context of 256"),
                      ((tmp_path / "nope",), "does not exist"),
                      (("--save-device", "Bad Name!"), "invalid device name"),
                      (("--save-device", "h100-sxm"), "shipped device profile")):
        res = invoke("profile", *args, "--no-bandwidth")
        assert res.exit_code == 1, (args, res.output)
        assert msg in res.output and "Traceback" not in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_cli_save_device_list_and_use(artifact, tmp_path):
    res = invoke("profile", "--save-device", "my-box", "--bandwidth-size", "4MiB", "--threads", "1")
    assert res.exit_code == 0, res.output
    saved = tmp_path / "devices" / "my-box.json"
    p = load_profile(saved)
    assert p.measured.threads == 1 and p.measured.working_set_bytes == 4 << 20 and p.memory_bandwidth_gbs.value > 0
    assert "measured" in p.memory_bandwidth_gbs.source
    res = invoke("profile", "--save-device", "my-box", "--bandwidth-size", "4MiB")
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = invoke("profile", "--list-devices")
    assert res.exit_code == 0 and "my-box" in res.output and "jetson-agx-orin-64gb" in res.output
    out = tmp_path / "rep"
    res = invoke("profile", artifact, "--bits", "4", "--prompt-len", 8, "--gen-len", 3, "--repeats", 1,
                 "--warmup", 0, "--device", "my-box", "--no-bandwidth", "--no-switch-matrix", "--no-competitors",
                 "-o", out)
    assert res.exit_code == 0, res.output
    r = validate_report(json.loads((out / "profile.json").read_text()))
    assert r["beside"]["device"] == "my-box" and r["rows"][0]["predicted_decode_tps"] > 0
    assert (out / "profile.png").is_file() and "predicted tok/s (my-box" in res.output
    res = invoke("profile", artifact, "--predict", "all", "--bits", "2-8", "-o", tmp_path / "pred")
    assert res.exit_code == 0 and "**Predicted**" in res.output and "snapdragon-8-gen3" in res.output


def test_save_profile_refuses_clashes(tmp_path):
    p = DeviceProfile("x", "a box", "cpu", "onnxruntime-cpu", Spec(10, "a measurement"), Spec(8, "a measurement"),
                      {"fp32": Spec(0.1, "a measurement")})
    path = save_profile(p, tmp_path)
    assert load_profile(path) == p
    with pytest.raises(DeviceError, match="exists"):
        save_profile(p, tmp_path)
    with pytest.raises(DeviceError, match="shipped"):
        save_profile(DeviceProfile("h100-sxm", *[getattr(p, k) for k in ("title", "kind", "preferred_backend",
                                                                         "memory_bandwidth_gbs", "memory_gib",
                                                                         "compute_tops")]), tmp_path)
    with pytest.raises(OtaroError):
        ProfileConfig(tmp_path, gen_len=1)


def test_profiler_runs_without_torch(artifact, tmp_path):
    code = textwrap.dedent(f"""
        import builtins, sys
        real_import = builtins.__import__
        def guarded(name, *a, **k):
            if name == "torch" or name.startswith("torch.") or name.split(".")[0] == "transformers":
                raise ImportError("torch is not installed on this device")
            return real_import(name, *a, **k)
        builtins.__import__ = guarded
        from pathlib import Path
        from otaro.profiling.measure import ProfileConfig, run_profile, predict_only
        from otaro.profiling.report import validate_report, write
        cfg = ProfileConfig(Path({str(artifact)!r}), bits=(2, 8), prompt_len=4, gen_len=2, repeats=1, warmup=0,
                            bandwidth_bytes=2 << 20, bandwidth_repeats=1, work_dir=Path({str(tmp_path / 'w')!r}))
        write(validate_report(run_profile(cfg, show_progress=False)), {str(tmp_path / 'o')!r})
        validate_report(predict_only(cfg.artifact, ["h200-sxm"], None, 8, 4))
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        assert not [m for m in sys.modules if m.startswith("otaro.export")]
        print("ok")
        """)
    env = dict(os.environ, OTARO_DEVICES_DIR=str(tmp_path / "devices"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_an_installed_wheel_carries_the_profiles_and_the_profiler():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"otaro.devices", "otaro.profiling"} <= set(cfg["packages"])
    assert "profiles/*.json" in cfg["package-data"]["otaro.devices"]
