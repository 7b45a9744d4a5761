"""This machine's memory bandwidth and matmul speed, measured (the roofline's ceilings).

Read bandwidth: a reduction (``max``, vectorised, releases the GIL) over a working set well
above the last-level cache — 1 GiB by default — split across ``threads`` threads, best of a
few repeats; that is what batch-1 decode does with the weights. Copy bandwidth: ``copyto`` of
half the working set into the other half, counted as read + write bytes (STREAM's convention).
The arrays are written once before timing, so page faults are not measured. fp32 matmul:
numpy's BLAS on square matrices, 2 n^3 FLOPs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_WORKING_SET = 1 << 30  # 1 GiB: far above any CPU's last-level cache in devices/
MIN_WORKING_SET = 1 << 20


@dataclass(frozen=True)
class Bandwidth:
    read_gbs: float  # best of the repeats, 1e9 bytes/s
    copy_gbs: float  # read + write bytes
    read_runs_gbs: tuple[float, ...]
    working_set_bytes: int
    threads: int
    repeats: int
    matmul_gflops: float | None = None
    matmul_n: int | None = None

    def to_json(self) -> dict:
        return {"read_gbs": self.read_gbs, "copy_gbs": self.copy_gbs, "read_runs_gbs": list(self.read_runs_gbs),
                "working_set_bytes": self.working_set_bytes, "threads": self.threads, "repeats": self.repeats,
                "matmul_gflops": self.matmul_gflops, "matmul_n": self.matmul_n}


def _chunks(a, n: int):
    import numpy as np

    return np.array_split(a, n)


def measure_bandwidth(working_set_bytes: int = DEFAULT_WORKING_SET, repeats: int = 3, threads: int | None = None,
                      matmul_n: int | None = 2048) -> Bandwidth:
    import numpy as np

    if working_set_bytes < MIN_WORKING_SET:
        raise ValueError(f"working set must be at least {MIN_WORKING_SET} bytes")
    threads = threads or os.cpu_count() or 1
    a = np.ones(working_set_bytes // 4, np.float32)  # written: every page is resident before timing
    read_runs = []
    with ThreadPoolExecutor(threads) as pool:
        parts = _chunks(a, threads)
        for _ in range(repeats + 1):  # the first pass warms the threads and the TLB; dropped
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            read_runs.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        read_runs = read_runs[1:]
        half = a.size // 2
        src, dst = _chunks(a[:half], threads), _chunks(a[half:2 * half], threads)
        copy = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[0], p[1]), zip(dst, src)))
            copy = max(copy, 2 * half * 4 / (time.perf_counter() - t) / 1e9)
    del a
    gflops = None
    if matmul_n:
        x = np.ones((matmul_n, matmul_n), np.float32)
        x @ x  # BLAS thread start-up
        best = min(_timed(lambda: x @ x) for _ in range(repeats))
        gflops = 2 * matmul_n ** 3 / best / 1e9
    return Bandwidth(max(read_runs), copy, tuple(read_runs), working_set_bytes, threads, repeats, gflops, matmul_n)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measured_profile(name: str, bw: Bandwidth, title: str | None = None, backend: str = "onnxruntime-cpu"):
    """A :class:`otaro.devices.DeviceProfile` of this machine from a measurement."""
    import datetime
    import platform

    from otaro.devices import DeviceProfile, Measured, Spec

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    cpu = _cpu_name()
    where = f"measured by `otaro profile --save-device` on {now[:10]} ({bw.threads} threads"
    mem = _memory_bytes()
    compute = {}
    if bw.matmul_gflops:
        compute["fp32"] = Spec(round(bw.matmul_gflops / 1e3, 4),
                               f"{where}, numpy fp32 matmul n={bw.matmul_n}, best of {bw.repeats})")
    machine = f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"
    return DeviceProfile(
        name=name, title=title or f"this machine: {cpu} ({os.cpu_count()} CPUs)", kind="cpu", preferred_backend=backend,
        memory_bandwidth_gbs=Spec(round(bw.read_gbs, 3), f"{where}, read of a {bw.working_set_bytes / 2**30:g} GiB "
                                                        f"working set, best of {bw.repeats}; copy {bw.copy_gbs:.1f} GB/s)"),
        memory_gib=Spec(round(mem / 2**30, 2), f"read on {now[:10]}: the system's total memory (/proc/meminfo "
                                               f"MemTotal)") if mem
        else Spec(1, "unknown: this system does not report its memory size", True),
        compute_tops=compute or {"fp32": Spec(1e-3, "unknown: matmul not measured", True)},
        notes="Sustained read bandwidth of this machine as measured, not a spec-sheet peak.",
        measured=Measured(now, "numpy: max-reduction read and copyto over the working set; fp32 BLAS matmul",
                          bw.threads, bw.working_set_bytes, machine))


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
