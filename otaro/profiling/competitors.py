"""The competitors' way, measured in the same run: one model file per precision.

llama.cpp (one GGUF per quant type), onnxruntime-genai (one folder per precision) and
ExecuTorch (one .pte per precision) deploy several precisions as several files; switching is
loading another file. Here that is a fresh onnxruntime session on a per-bit ONNX file: the
artifact's own ``variants/`` where it has them, else a fixed-precision MatMulNBits model
written from the artifact (the very bytes the runtime builds in memory at that b, so the
comparison is the same weights, only the way of switching differs). Disk: the per-bit files
for every precision the artifact carries against the one SEFP model.

``llama-bench`` runs on a GGUF of the same weights when it is installed (``$LLAMA_BENCH`` or
on PATH) and a GGUF is given; otherwise the row says why it was skipped. otaro never builds it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

ALIGN = 64  # byte alignment of each tensor in a written data file


def folder_model_bytes(folder: Path) -> int:
    """Bytes of the model files (``model.onnx*``) of an artifact or variant folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx") and p.is_file())


def write_fixed_model(master, bits: int, backend, dest: Path, threads: int | None = None) -> Path:
    """Write the artifact's model at a fixed ``bits`` as ``dest/model.onnx`` + ``model.onnx_data``:
    what :func:`otaro.runtime.switch.build_model` holds in memory, on disk."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import onnx
    from onnx import TensorProto

    from otaro.runtime.switch import build_model

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        built = build_model(master, master.uniform(bits), backend.container_for, backend.accuracy_level, pool,
                            fuse_siblings=backend.fuse_siblings)
    proto = onnx.ModelProto()
    proto.ParseFromString(built.model)
    _retie_heads(proto, built.shared, built.files)
    dest.mkdir(parents=True, exist_ok=True)
    offset = 0
    with open(dest / "model.onnx_data", "wb") as f:
        for t in proto.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            ext = {e.key: e.value for e in t.external_data}
            if t.name in built.shared:  # its value is the shared array (a tied head: transposed)
                buf = np.ascontiguousarray(built.shared[t.name]).reshape(-1).view(np.uint8)
            else:
                off = int(ext.get("offset", 0))
                buf = built.files[ext["location"]][off:off + int(ext["length"])]
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(memoryview(np.ascontiguousarray(buf)))
            del t.external_data[:]
            for k, v in (("location", "model.onnx_data"), ("offset", str(offset)), ("length", str(buf.nbytes))):
                t.external_data.add(key=k, value=v)
            offset += buf.nbytes
    (dest / "model.onnx").write_bytes(proto.SerializeToString())
    return dest / "model.onnx"


def _retie_heads(proto, shared: dict, files: dict) -> None:
    """The runtime keeps a tied head as its own transposed array (``Master._share_transposed_heads``:
    one transpose per process instead of one per session), described by an initializer that
    points at the embedding's bytes. On disk it becomes ``Transpose(embedding)`` again, as the
    exporter writes it, so a per-bit file stores the embedding once, like a competitor's file."""
    import numpy as np
    from onnx import TensorProto, helper

    g = proto.graph
    where: dict[tuple, list] = {}
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            where.setdefault((ext.get("location"), ext.get("offset", "0"), ext.get("length")), []).append(t)

    def stored(t, location) -> bool:  # its value is the file's bytes (not a transposed copy of them)
        return t.name not in shared or np.shares_memory(shared[t.name], files[location])

    drop, nodes = set(), []
    for (location, _, _), ts in where.items():
        for t in ts:
            if len(t.dims) != 2 or stored(t, location):
                continue
            src = next((o for o in ts if o is not t and stored(o, location) and list(o.dims) == list(t.dims)[::-1]),
                       None)
            if src is not None:
                drop.add(t.name)
                nodes.append(helper.make_node("Transpose", [src.name], [t.name], name=f"{t.name}/tied_transpose",
                                              perm=[1, 0]))
    if drop:
        keep = [t for t in g.initializer if t.name not in drop]
        g.ClearField("initializer")
        g.initializer.extend(keep)
        for i, n in enumerate(nodes):  # first: they read initializers only
            g.node.insert(i, n)


def evict_page_cache(files) -> bool:
    """Drop the page cache of ``files`` (``posix_fadvise`` DONTNEED: no root needed); False
    where the OS cannot, and the "cold" load then is a warm one (reported as such)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except OSError:
        return False


def load_seconds(model: Path, make_session: Callable[[Path], object], cold: bool) -> tuple[float, bool]:
    """Seconds to create a session on ``model`` (the competitor's switch); (seconds, was cold)."""
    was_cold = False
    if cold:
        if hasattr(os, "sync"):
            os.sync()  # DONTNEED drops clean pages only: write back a file just written first
        was_cold = evict_page_cache([p for p in model.parent.iterdir() if p.name.startswith("model.onnx")])
    t = time.perf_counter()
    session = make_session(model)
    seconds = time.perf_counter() - t
    del session
    return seconds, was_cold


# --------------------------------------------------------------------------- llama-bench


def find_llama_bench() -> str | None:
    env = os.environ.get("LLAMA_BENCH")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    return shutil.which("llama-bench")


def run_llama_bench(ggufs, prompt_len: int, gen_len: int, repeats: int, threads: int | None,
                    timeout: float = 1800) -> dict:
    """llama-bench's pp/tg rows on each GGUF, or a note saying why there are none."""
    exe = find_llama_bench()
    if exe is None:
        why = ("$LLAMA_BENCH does not name an executable file" if os.environ.get("LLAMA_BENCH")
               else "llama-bench is not on PATH and $LLAMA_BENCH is not set")
        return {"status": "skipped", "note": f"{why}: llama.cpp's row is skipped (otaro does not build llama.cpp)",
                "rows": []}
    if not ggufs:
        return {"status": "skipped", "note": f"llama-bench found ({exe}) but no GGUF of the same weights was given "
                                             f"(--gguf FILE)", "rows": []}
    rows, errors = [], []
    for g in ggufs:
        cmd = [exe, "-m", str(g), "-p", str(prompt_len), "-n", str(gen_len), "-r", str(repeats), "-o", "json"]
        if threads:
            cmd += ["-t", str(threads)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{Path(g).name}: {e}")
            continue
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            errors.append(f"{Path(g).name}: exit {r.returncode}: {tail}")
            continue
        try:
            entries = json.loads(r.stdout)
        except ValueError:
            errors.append(f"{Path(g).name}: llama-bench printed no JSON")
            continue
        pp = next((e for e in entries if e.get("n_prompt") and not e.get("n_gen")), None)
        tg = next((e for e in entries if e.get("n_gen") and not e.get("n_prompt")), None)
        rows.append({"gguf": str(g), "model_type": (pp or tg or {}).get("model_type"),
                     "model_size_bytes": (pp or tg or {}).get("model_size"),
                     "disk_bytes": Path(g).stat().st_size if Path(g).is_file() else None,
                     "prefill_tps": pp.get("avg_ts") if pp else None, "prefill_tps_std": pp.get("stddev_ts") if pp else None,
                     "decode_tps": tg.get("avg_ts") if tg else None, "decode_tps_std": tg.get("stddev_ts") if tg else None,
                     "threads": (pp or tg or {}).get("n_threads"), "build": (pp or tg or {}).get("build_commit")})
    status = "ran" if rows else "failed"
    note = f"{exe}" + (f"; errors: {'; '.join(errors)}" if errors else "")
    return {"status": status, "note": note, "rows": rows}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
