"""``otaro profile``: measure an artifact at each bit-width on this machine, beside the roofline.

One run, one process, in this order (so that each measurement has the memory to itself):
  1. this machine's memory bandwidth and matmul speed (:mod:`otaro.profiling.bandwidth`);
  2. per bit-width, after a warm-up: prefill latency of a P-token prompt, time to first token
     through the public API, decode tokens/s of a G-token greedy continuation (the same KV-cache
     loop as ``benchmarks/runtime_bench.py``, EOS ignored so every repeat decodes G tokens), peak
     and resident memory (Linux ``VmHWM`` after resetting it), and the cold switch that built it;
  3. the switch latency from every precision to every other, cold (nothing cached: derive +
     pack + session) and warm (cached), along one closed walk that takes each ordered pair once;
  4. the competitors' way (:mod:`otaro.profiling.competitors`): a session on a per-bit file;
  5. roofline predictions (:mod:`otaro.profiling.roofline`) for this machine, beside the
     measurement, and for any ``--predict`` device.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from otaro.errors import OtaroError
from otaro.profiling.bandwidth import DEFAULT_WORKING_SET, MIN_WORKING_SET

# A prompt of real text (when the artifact has a tokenizer), repeated to the requested length.
SAMPLE = ("The committee met on Tuesday morning and agreed, after a long discussion of the budget, "
          "to postpone the vote until the next session. Several members asked for more detail on the "
          "costs of the new library, the repairs to the bridge and the plans for the harbour. ")
ALL_CACHED = 1 << 50  # a cache budget nothing exceeds: every precision stays warm


@dataclass(frozen=True)
class ProfileConfig:
    artifact: Path
    bits: tuple[int, ...] | None = None  # None: every bit-width the artifact carries
    backend: str = "onnxruntime-cpu"
    prompt_len: int = 128
    gen_len: int = 64
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    accuracy_level: int | None = None
    device: str | None = None  # profile for the prediction beside the measurement; None: measured now
    predict: tuple[str, ...] = ()  # more devices to predict for
    bandwidth_bytes: int = DEFAULT_WORKING_SET
    bandwidth_repeats: int = 3
    measure_bandwidth: bool = True
    switch_matrix: bool = True
    competitors: bool = True
    ggufs: tuple[Path, ...] = ()
    work_dir: Path | None = None  # per-bit files are written here (default: a temporary folder)
    verify: bool = True

    def __post_init__(self):
        from otaro.runtime.backends import BACKENDS

        object.__setattr__(self, "artifact", Path(self.artifact))
        for k, lo in (("prompt_len", 1), ("gen_len", 2), ("repeats", 1), ("warmup", 0), ("bandwidth_repeats", 1)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise OtaroError(f"{k.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.backend not in BACKENDS:
            raise OtaroError(f"unknown backend {self.backend!r}: choose one of {', '.join(sorted(BACKENDS))}")
        if self.bits is not None:
            bits = tuple(self.bits)
            if not bits or len(set(bits)) != len(bits):
                raise OtaroError(f"--bits must list distinct bit-widths, got {list(bits)}")
            object.__setattr__(self, "bits", bits)
        if self.measure_bandwidth and self.bandwidth_bytes < MIN_WORKING_SET:
            raise OtaroError(f"the bandwidth working set must be at least {MIN_WORKING_SET} bytes")
        object.__setattr__(self, "predict", tuple(self.predict))
        object.__setattr__(self, "ggufs", tuple(Path(g) for g in self.ggufs))
        for g in self.ggufs:
            if not g.is_file():
                raise OtaroError(f"GGUF file {g} does not exist")


# --------------------------------------------------------------------------- small helpers


def stats(values: Sequence[float]) -> dict:
    v = list(values)
    med = statistics.median(v)
    return {"median": med, "min": min(v), "max": max(v), "mean": statistics.fmean(v),
            "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
            "spread": (max(v) - min(v)) / med if med else 0.0, "values": v}


def switch_walk(bits: Sequence[int]) -> list[int]:
    """A closed walk over ``bits`` that takes every ordered pair (a, b), a != b, exactly once
    (an Eulerian circuit of the complete directed graph: every node has in = out degree)."""
    bits = list(bits)
    if len(bits) < 2:
        return bits
    out = {a: [b for b in reversed(bits) if b != a] for a in bits}
    stack, path = [bits[0]], []
    while stack:
        v = stack[-1]
        if out[v]:
            stack.append(out[v].pop())
        else:
            path.append(stack.pop())
    return path[::-1]


def _proc_statuses(*keys: str) -> tuple[int | None, ...]:
    """Values of ``keys`` (bytes) from one read of /proc/self/status: one snapshot, so VmHWM is
    never below VmRSS (two reads let an allocation in between grow the RSS past the peak read)."""
    got: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    got[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return tuple(got.get(k) for k in keys)


def _proc_status(key: str) -> int | None:
    return _proc_statuses(key)[0]


def reset_peak_memory() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    import platform

    import numpy
    import onnxruntime

    from otaro import __version__
    from otaro.profiling.bandwidth import _cpu_name

    return {"cpu": _cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
            "otaro": __version__}


def prompt_ids(rt, n: int) -> list[int]:
    if rt.tokenizer is not None:
        ids = rt.tokenizer.encode(SAMPLE, add_special_tokens=False).ids
        if ids:
            return (ids * (n // len(ids) + 1))[:n]
    vocab = (rt.manifest.get("architecture") or {}).get("vocab_size") or 100
    return [(7 * i) % max(vocab - 1, 1) + 1 for i in range(n)]


def _manifest(root: Path) -> dict:
    from otaro.runtime.artifact import ArtifactError, read_manifest

    if not Path(root).exists():
        raise ArtifactError(f"artifact {root} does not exist")
    return read_manifest(root)


def _checked_bits(cfg: ProfileConfig, manifest: dict) -> tuple[int, ...]:
    have = tuple(manifest["bits"])
    bits = cfg.bits or have
    missing = [b for b in bits if b not in have]
    if missing:
        raise OtaroError(f"the artifact {cfg.artifact} has no bit-width {','.join(map(str, missing))}: it carries "
                         f"{','.join(map(str, have))}")
    return tuple(bits)


# --------------------------------------------------------------------------- measuring


def _decode_round(dec, ids: list[int], gen_len: int):
    """(prefill s, decode tokens/s) of one greedy continuation through the KV-cache loop."""
    import numpy as np

    x = np.asarray([ids], np.int64)
    mask = np.ones_like(x)
    t0 = time.perf_counter()
    # the prompt's last logits only, as generation asks for them (time to the first token)
    logits, past = dec.forward(x, mask, dec.empty_past(1), rows=[[x.shape[1] - 1]])
    t1 = time.perf_counter()
    for _ in range(gen_len - 1):  # the first of the gen_len tokens comes from the prefill
        tok = np.argmax(logits[:, -1], axis=-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, past = dec.forward(tok, mask, past)
    t2 = time.perf_counter()
    return t1 - t0, (gen_len - 1) / (t2 - t1)


def measure_bits(rt, b: int, ids: list[int], cfg: ProfileConfig) -> dict:
    reset_ok = reset_peak_memory()
    rep = rt.set_precision(b)  # cold: the previous precision is evicted (cache budget 0)
    switch_peak = _proc_status("VmHWM") if reset_ok else None
    rt.wait_for_huge_pages()  # timed at the steady speed, without the background move beside it
    gc.collect()
    reset_ok = reset_peak_memory()
    dec = rt.decoder
    prefill, tps, ttft = [], [], []
    for r in range(cfg.warmup + cfg.repeats):
        p, t = _decode_round(dec, ids, cfg.gen_len)
        g = rt.generate(ids, max_new_tokens=1)  # public API: prefill + sampling + detokenize
        if r >= cfg.warmup:
            prefill.append(p)
            tps.append(t)
            ttft.append(g.seconds)
    peak, rss = _proc_statuses("VmHWM", "VmRSS")
    return {"bits": b, "switch_s": rep.seconds, "switch_cached": rep.cached, "derive_s": rep.derive_seconds,
            "session_s": rep.session_seconds, "switch_extra_bytes": rep.extra_bytes,
            "switch_peak_rss_bytes": switch_peak,
            "prefill_s": stats(prefill), "ttft_s": stats(ttft), "decode_tps": stats(tps),
            "peak_rss_bytes": peak if reset_ok else None, "rss_bytes": rss}


def measure_switches(rt_cold_factory, rt_warm_factory, bits: Sequence[int], bar) -> dict:
    walk = switch_walk(bits)
    n = len(bits)
    idx = {b: i for i, b in enumerate(bits)}
    cold = [[None] * n for _ in range(n)]
    warm = [[None] * n for _ in range(n)]
    detail = []
    if n >= 2:
        rt = rt_cold_factory()
        rt.set_precision(walk[0])
        for a, b in zip(walk, walk[1:]):
            rep = rt.set_precision(b)
            cold[idx[a]][idx[b]] = rep.seconds
            detail.append({"from": a, "to": b, "seconds": rep.seconds, "derive_s": rep.derive_seconds,
                           "session_s": rep.session_seconds, "cached": rep.cached})
            bar.update(1)
        del rt
        gc.collect()
        rt = rt_warm_factory()
        for b in bits:  # make every precision warm
            rt.set_precision(b)
        rt.set_precision(walk[0])
        for a, b in zip(walk, walk[1:]):
            rep = rt.set_precision(b)
            warm[idx[a]][idx[b]] = rep.seconds
            bar.update(1)
        del rt
        gc.collect()
    flat = lambda m: [x for row in m for x in row if x is not None]  # noqa: E731
    return {"bits": list(bits), "walk": walk, "cold_s": cold, "warm_s": warm, "cold_detail": detail,
            "cold_median_s": statistics.median(flat(cold)) if flat(cold) else None,
            "warm_median_s": statistics.median(flat(warm)) if flat(warm) else None}


def measure_competitors(master, manifest: dict, backend, cfg: ProfileConfig, bits: Sequence[int], bar) -> dict:
    from otaro.profiling.competitors import folder_model_bytes, load_seconds, run_llama_bench, write_fixed_model
    from otaro.runtime.backends import session_options

    import onnxruntime as ort

    root = cfg.artifact
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="otaro-profile-"))
    made: list[Path] = []

    def session(path: Path):
        return ort.InferenceSession(str(path), session_options(backend, cfg.threads), providers=list(backend.providers))

    fixed = {v["bits"]: v for v in manifest["variants"] if v["kind"] == "sefp-fixed"}
    rows, warmed_up = [], False
    try:
        for b in manifest["bits"]:  # disk for every precision the artifact carries; timings for --bits
            if b in fixed:
                folder, source = root / fixed[b]["path"], f"variant {fixed[b]['name']}"
            else:
                folder, source = work / f"sefp-b{b}", "written from the artifact"
                write_fixed_model(master, b, backend, folder, cfg.threads)
                made.append(folder)
            row = {"bits": b, "kind": "per-bit SEFP file", "source": source, "disk_bytes": folder_model_bytes(folder),
                   "container_bits": backend.container_for(master.fmt.code_bits(b))}
            if b in bits:
                model = folder / "model.onnx"
                if not warmed_up:  # the first session of the process pays for one-off set-up
                    load_seconds(model, session, cold=False)
                    warmed_up = True
                warm = [load_seconds(model, session, cold=False)[0] for _ in range(2)]
                cold_s, was_cold = load_seconds(model, session, cold=True)
                row.update(load_warm_s=statistics.median(warm), load_cold_s=cold_s, cold_evicted=was_cold)
                bar.update(1)
            rows.append(row)
        for v in manifest["variants"]:
            if v["kind"] == "sefp-fixed":
                continue
            folder = root / v["path"]
            model = folder / "model.onnx"
            warm = [load_seconds(model, session, cold=False)[0] for _ in range(2)]
            cold_s, was_cold = load_seconds(model, session, cold=True)
            rows.append({"bits": v["bits"], "kind": f"variant {v['name']} ({v['format']})", "source": "artifact variant",
                         "disk_bytes": folder_model_bytes(folder), "container_bits": v.get("container_bits"),
                         "load_warm_s": statistics.median(warm), "load_cold_s": cold_s, "cold_evicted": was_cold})
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    per_bit = [r for r in rows if r["kind"] == "per-bit SEFP file"]
    disk = {"artifact_bytes": folder_model_bytes(root), "per_bit_total_bytes": sum(r["disk_bytes"] for r in per_bit),
            "per_bit_bits": [r["bits"] for r in per_bit]}
    disk["ratio"] = disk["per_bit_total_bytes"] / disk["artifact_bytes"]
    return {"files": rows, "disk": disk, "work_dir": str(cfg.work_dir) if cfg.work_dir else None,
            "llama_bench": run_llama_bench(cfg.ggufs, cfg.prompt_len, cfg.gen_len, cfg.repeats, cfg.threads)}


# --------------------------------------------------------------------------- the profile


def decode_fit(rows: Sequence[dict]) -> dict | None:
    """Least squares of seconds per token = bytes / bandwidth + overhead across the bit-widths:
    the bandwidth the decode loop actually gets from the weights, and the per-token time that
    does not scale with them (op dispatch, attention, activations, sampling). None when the
    rows do not read at least two different byte counts."""
    pts = sorted({(r["bytes_per_token"]["total"], 1 / r["decode_tps"]["median"]) for r in rows})
    xs = [x for x, _ in pts]
    if len(set(xs)) < 2:
        return None
    n = len(pts)
    mx, my = sum(xs) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in pts)
    return {"bandwidth_gbs": 1 / slope / 1e9 if slope > 0 else None, "overhead_s": intercept,
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0, "points": n}


def _container_fn(containers: Sequence[int]):
    return lambda code: next((c for c in sorted(containers) if c >= code), None)


def prediction_rows(shape, bits, containers, bandwidth_bytes_per_s, peak, prompt_len, gen_len, memory_bytes):
    from otaro.profiling.roofline import predict

    out = []
    for b in bits:
        p = predict(shape, b, _container_fn(containers), bandwidth_bytes_per_s, peak, prompt_len, gen_len, memory_bytes)
        out.append({"bits": b, "container_bits": p.container_bits, "decode_tps": p.decode_tps,
                    "memory_bound_tps": p.memory_bound_tps, "compute_bound_tps": p.compute_bound_tps, "bound": p.bound,
                    "prefill_s": p.prefill_s, "bytes_per_token": p.bytes_per_token, "footprint": p.footprint,
                    "fits": p.fits})
    return out


def device_prediction(shape, device, bits, prompt_len: int, gen_len: int, backend: str | None = None,
                      accuracy_level: int = 4) -> dict:
    """The roofline of ``shape`` on a device profile, run on ``backend`` (default: its preferred one)."""
    from otaro.profiling.roofline import compute_kind
    from otaro.runtime.backends import BACKENDS

    backend = backend or device.preferred_backend
    kind = compute_kind(backend, accuracy_level)
    peak = device.peak(kind)
    return {"device": device.name, "title": device.title, "backend": backend,
            "containers": list(BACKENDS[backend].containers),
            "bandwidth_gbs": device.memory_bandwidth_gbs.value, "bandwidth_uncertain": device.memory_bandwidth_gbs.uncertain,
            "bandwidth_source": device.memory_bandwidth_gbs.source,
            "memory_gib": device.memory_gib.value, "compute_kind": kind if peak is device.compute_tops.get(kind) else "fp32",
            "peak_tops": peak.value if peak else None, "peak_uncertain": peak.uncertain if peak else None,
            "measured": device.measured is not None,
            "rows": prediction_rows(shape, bits, BACKENDS[backend].containers, device.bandwidth_bytes_per_s,
                                    peak.value * 1e12 if peak else None, prompt_len, gen_len, device.memory_bytes)}


def _notes(shape, bits, containers, backend: str) -> list[str]:
    from otaro.profiling.roofline import FIT_FRACTION, shared_containers

    notes = []
    for c, bs in sorted(shared_containers(bits, shape, _container_fn(containers)).items()):
        if len(bs) > 1:
            notes.append(f"on {backend} b = {', '.join(map(str, bs))} run in the {c}-bit MatMulNBits container: they "
                         f"read the same bytes per token, so their speeds differ only by noise")
    notes.append(f"'fits' = the runtime's footprint (the master file held to switch + this precision's packed weights "
                 f"+ the KV cache) is at most {FIT_FRACTION:.0%} of the device's memory (a rule of thumb)")
    notes.append("bytes per token: quantized codes + fp32 scales in the container the backend runs, every float "
                 "tensor read in full (the fp32 LM head dominates small models), one embedding row, and the KV "
                 "cache at the mean decode position")
    notes.append("a roofline is an upper bound: it leaves out per-token fixed costs (per-node dispatch on CPUs, kernel "
                 "launches on GPUs), which dominate small models on fast devices long before bandwidth does")
    return notes


def predict_only(artifact: Path, devices: Sequence[str], bits: Sequence[int] | None, prompt_len: int,
                 gen_len: int) -> dict:
    """Roofline predictions for devices you cannot run on (no measurement)."""
    from otaro.devices import get_device
    from otaro.profiling.roofline import ModelShape
    from otaro.runtime.backends import BACKENDS

    profiles = [get_device(d) for d in _expand(devices)]  # unknown names fail before any work
    cfg = ProfileConfig(artifact, bits=tuple(bits) if bits else None, prompt_len=prompt_len, gen_len=gen_len,
                        measure_bandwidth=False)
    m = _manifest(artifact)
    bits = _checked_bits(cfg, m)
    shape = ModelShape.from_artifact(artifact, m)
    preds = [device_prediction(shape, d, bits, prompt_len, gen_len, accuracy_level=m["accuracy_level"])
             for d in profiles]
    notes = []
    for be in sorted({p["backend"] for p in preds}):
        notes += [n for n in _notes(shape, bits, BACKENDS[be].containers, be) if n not in notes]
    return {"otaro_profile": 1, "mode": "predicted", "created": _now(), "artifact": _artifact_info(artifact, m, shape),
            "config": {"bits": list(bits), "prompt_len": prompt_len, "gen_len": gen_len}, "machine": machine_info(),
            "predictions": preds, "notes": notes}


def _expand(devices: Sequence[str]) -> list[str]:
    from otaro.devices import known_devices

    if "all" in devices:
        return sorted(known_devices())
    return list(dict.fromkeys(devices))


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _artifact_info(root: Path, m: dict, shape) -> dict:
    from otaro.profiling.competitors import folder_model_bytes

    return {"path": str(root), "format": m["sefp"]["format"], "arch": (m.get("architecture") or {}).get("arch"),
            "bits": list(m["bits"]), "default_bits": m["default_bits"], "layers": len(m["layers"]),
            "quantized_params": shape.quantized_params, "float_read_bytes": shape.float_read_bytes,
            "kv_bytes_per_position": shape.kv_bytes_per_position, "disk_bytes": folder_model_bytes(root),
            "master_bytes": shape.master_bytes}


def run_profile(cfg: ProfileConfig, show_progress: bool = True) -> dict:
    """Measure ``cfg.artifact`` on this machine (see the module docstring); the report dict."""
    from otaro.devices import get_device
    from otaro.profiling.bandwidth import measure_bandwidth, measured_profile
    from otaro.profiling.roofline import ModelShape
    from otaro.progress import progress
    from otaro.runtime import Runtime
    from otaro.runtime.backends import BACKENDS

    # Everything that can be wrong with the request fails here, before minutes of measuring.
    m = _manifest(cfg.artifact)
    bits = _checked_bits(cfg, m)
    here = get_device(cfg.device) if cfg.device else None
    others = [get_device(d) for d in _expand(cfg.predict)]
    device = BACKENDS[cfg.backend].device
    import onnxruntime as ort

    from otaro.runtime.backends import select_backend

    level = m["accuracy_level"] if cfg.accuracy_level is None else cfg.accuracy_level
    choice = select_backend(device, ort.get_available_providers(), level)  # not installed: one line
    if choice.backend != cfg.backend:
        raise OtaroError(f"backend {cfg.backend} is not available here (onnxruntime would use {choice.backend}): "
                         f"{BACKENDS[cfg.backend].install_hint}")
    ctx = Runtime._model_config(cfg.artifact, m)["context"]
    if ctx and cfg.prompt_len + cfg.gen_len > ctx:
        raise OtaroError(f"--prompt-len {cfg.prompt_len} + --gen-len {cfg.gen_len} exceeds the model's context of "
                         f"{ctx} tokens")
    shape = ModelShape.from_artifact(cfg.artifact, m)
    threads = cfg.threads or os.cpu_count() or 1
    load_start = load_average()
    t_start = time.perf_counter()
    n = len(bits)
    total = n + (2 * n * (n - 1) if cfg.switch_matrix and n > 1 else 0) + (n if cfg.competitors else 0) \
        + (1 if cfg.measure_bandwidth else 0)
    bw = switches = competitors = None
    with progress(total=total, desc="profile", unit="step", enabled=show_progress) as bar:
        if cfg.measure_bandwidth:  # first, while the model's memory is not taken yet
            bar.set_postfix_str("memory bandwidth")
            bw = measure_bandwidth(cfg.bandwidth_bytes, cfg.bandwidth_repeats, threads)
            bar.update(1)
        # Loaded at the last bit-width, so that the first one is measured after a cold switch too.
        rt = Runtime.load(cfg.artifact, device=device, threads=cfg.threads, accuracy_level=cfg.accuracy_level,
                          bits=bits[-1], cache_bytes=0, verify=cfg.verify)
        load_switch = rt.last_switch  # what building the first precision cost (used when only one is profiled)
        backend = rt.backend
        ids = prompt_ids(rt, cfg.prompt_len)
        rows = []
        for b in bits:
            bar.set_postfix_str(f"b={b}")
            row = measure_bits(rt, b, ids, cfg)
            if row["switch_cached"]:  # a single bit-width: its cold switch was the load's
                row.update(switch_s=load_switch.seconds, derive_s=load_switch.derive_seconds,
                           session_s=load_switch.session_seconds, switch_extra_bytes=load_switch.extra_bytes,
                           switch_cached=False)
            rows.append(row)
            bar.update(1)
        master = rt.master
        del rt
        gc.collect()
        if cfg.switch_matrix:
            bar.set_postfix_str("switch matrix")
            load = dict(device=device, threads=cfg.threads, accuracy_level=backend.accuracy_level, bits=bits[0],
                        verify=False)
            switches = measure_switches(lambda: Runtime.load(cfg.artifact, cache_bytes=0, **load),
                                        lambda: Runtime.load(cfg.artifact, cache_bytes=ALL_CACHED, **load), bits, bar)
        if cfg.competitors:
            bar.set_postfix_str("per-bit files")
            competitors = measure_competitors(master, m, backend, cfg, bits, bar)
        del master
    load_end = load_average()

    # Predictions: this machine (a named profile, or the bandwidth just measured) on the backend
    # that ran, beside the measurement; other devices on their preferred backends.
    if here is None and bw is not None:
        here = measured_profile("this-machine", bw, backend=cfg.backend)
    beside = device_prediction(shape, here, bits, cfg.prompt_len, cfg.gen_len, cfg.backend,
                               backend.accuracy_level) if here else None
    pred_by_bits = {r["bits"]: r for r in beside["rows"]} if beside else {}
    for r in rows:
        p = pred_by_bits.get(r["bits"])
        r["container_bits"] = backend.container_for(shape.code_bits(r["bits"]))
        positions = cfg.prompt_len + (cfg.gen_len - 1) / 2
        r["bytes_per_token"] = shape.decode_bytes(r["bits"], backend.container_for, positions)
        r["footprint"] = shape.footprint(r["bits"], backend.container_for, cfg.prompt_len + cfg.gen_len)
        med = r["decode_tps"]["median"]
        r["roofline_tps"] = bw.read_gbs * 1e9 / r["bytes_per_token"]["total"] if bw else None
        r["roofline_fraction"] = med / r["roofline_tps"] if bw else None
        r["predicted_decode_tps"] = p["decode_tps"] if p else None
        r["predicted_prefill_s"] = p["prefill_s"] if p else None
        r["prediction_error"] = med / p["decode_tps"] - 1 if p else None
    report = {
        "otaro_profile": 1, "mode": "measured", "created": _now(), "seconds": time.perf_counter() - t_start,
        "artifact": _artifact_info(cfg.artifact, m, shape),
        "config": {"bits": list(bits), "backend": cfg.backend, "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len,
                   "repeats": cfg.repeats, "warmup": cfg.warmup, "threads": threads,
                   "accuracy_level": backend.accuracy_level, "providers": list(backend.providers)},
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_end},
        "bandwidth": bw.to_json() if bw else None,
        "device": {"name": here.name, "title": here.title, "measured": here.measured is not None,
                   "bandwidth_gbs": here.memory_bandwidth_gbs.value} if here else None,
        "rows": rows, "decode_fit": decode_fit(rows), "switch": switches, "competitors": competitors,
        "beside": beside, "predictions": [device_prediction(shape, d, bits, cfg.prompt_len, cfg.gen_len,
                                                            accuracy_level=backend.accuracy_level) for d in others],
        "notes": _notes(shape, bits, backend.containers, cfg.backend),
    }
    # the load at the start is the other processes' (at the end it includes this run's own threads)
    if load_start and os.cpu_count() and load_start[0] > 0.5 * os.cpu_count():
        report["notes"].append(f"the machine was loaded during the run (load average {load_start[0]} at the start, "
                               f"{(load_end or ['?'])[0]} at the end, {os.cpu_count()} CPUs): timings are noisier "
                               f"and slower than on an idle machine")
    return report
