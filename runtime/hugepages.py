"""Transparent huge pages for a session's weights (Linux; a no-op elsewhere).

A decode step streams every weight once: on SmolLM2 ~90 MB per token at b = 4, about 22,000
distinct 4 KiB pages, each a TLB miss and a page walk. onnxruntime's prepacked MatMulNBits weights
live in glibc's heaps and mappings, which glibc does not mark for transparent huge pages (THP is
``madvise`` on most distributions: only marked memory gets 2 MiB pages). numpy marks its own big
arrays, so the master bytes were already huge; the weights that decoding reads were not. After a
session is built, the runtime marks the anonymous mappings that appeared or grew during the
build (``MADV_HUGEPAGE``) and collapses them into 2 MiB pages now (``MADV_COLLAPSE``, Linux 6.1+;
older kernels leave it to khugepaged). Measured on SmolLM2 (benchmarks/RESULTS.md "hugepages"):
1.05-1.09x decode tokens/s at b = 2, 4, 8, the same RSS. glibc's own switch for this,
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, must be set before the process starts; this works in
any process.

Call order matters: collapse *after* ``malloc_trim``, whose ``MADV_DONTNEED`` on free pages
would split a huge page again.

The collapse copies each 2 MiB span into a fresh huge page: for the first build of a process
(SmolLM2, ~250 MiB of new mappings) that took 0.4-0.9 s here, after a switch ~20 ms (the new
weights partly land in memory already marked, which the kernel backs with huge pages as they are
written). So :class:`Collapser` does it on a background thread: the
session is usable at once (on 4 KiB pages until its spans are moved; the kernel moves live
memory safely), and the build's time does not include it. The thread runs at nice 19: the copy
is CPU work that competes with the first request after a build (docs/DESIGN.md §7.18).
"""

from __future__ import annotations

import sys
import threading

from otaro.runtime import libc

HUGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25

_LIBC = None


def _madvise():
    """The C library with ``madvise`` and ``mincore`` typed, or False (not Linux, none loaded)."""
    global _LIBC
    if _LIBC is None:
        lib = libc.load() if sys.platform.startswith("linux") else None
        if lib is not None and hasattr(lib, "madvise") and hasattr(lib, "mincore"):
            import ctypes

            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.madvise.restype = ctypes.c_int
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
            lib.mincore.restype = ctypes.c_int
            _LIBC = lib
        else:
            _LIBC = False
    return _LIBC


def anonymous_ranges(maps: str | None = None) -> set[tuple[int, int]]:
    """(start, end) of every private read-write anonymous mapping (heaps included), from
    ``/proc/self/maps`` (or ``maps``, its text); empty where there is none."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return set()
    out = set()
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or not parts[1].startswith("rw") or not parts[1].endswith("p"):
            continue
        path = parts[5].strip() if len(parts) > 5 else ""
        if path not in ("", "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.add((lo, hi))
    return out


def huge_spans(ranges) -> list[tuple[int, int]]:
    """The whole 2 MiB-aligned spans inside each range (a huge page cannot straddle a mapping)."""
    spans = []
    for lo, hi in sorted(ranges):
        a, b = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        if b > a:
            spans.append((a, b))
    return spans


def _resident(lib, a: int, n: int) -> bool:
    """Every 4 KiB page of [a, a + n) resident (``mincore``)."""
    import ctypes

    pages = n // 4096
    vec = (ctypes.c_ubyte * pages)()
    if lib.mincore(ctypes.c_void_p(a), ctypes.c_size_t(n), vec) != 0:
        return False
    return all(v & 1 for v in bytes(vec))


def collapse_new(before: set[tuple[int, int]]) -> int:
    """Mark and collapse the anonymous mappings that are not in ``before`` (new, or grown: a
    grown mapping has a new end). Only spans whose every page is resident: collapsing fills the
    holes ``malloc_trim`` handed back (the in-memory build leaves ~100 MiB of them on SmolLM2),
    and a marked span with holes is one khugepaged would fill later. Returns the bytes asked
    for; failures (no THP, an old kernel, no free huge pages) leave the memory as it was."""
    lib = _madvise()
    if not lib:
        return 0
    total = 0
    for a, b in huge_spans(anonymous_ranges() - before):
        for x in range(a, b, HUGE):
            if _resident(lib, x, HUGE) and lib.madvise(x, HUGE, MADV_HUGEPAGE) == 0:
                lib.madvise(x, HUGE, MADV_COLLAPSE)
                total += HUGE
    return total


def _lower_priority() -> None:
    """The calling thread yields the CPU to every normal one (Linux: a thread's nice value is
    its own). Moving pages is never urgent; on 2 cores, at normal priority it had slowed the first
    request after a switch by 50-170 ms."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


class Collapser:
    """:func:`collapse_new` on one background thread, builds queued in order (a later build's
    ranges are collected when its turn comes, so nothing is asked twice). ``wait()`` returns
    when every queued collapse is done."""

    def __init__(self):
        # Bound now: a collapser still running for an earlier runtime keeps the function it
        # was made with (tests replace the module's).
        self._collapse = collapse_new
        self._cv = threading.Condition()
        self._queue: list[set[tuple[int, int]]] = []
        self._busy = False
        self.collapsed = 0  # bytes asked for so far

    def submit(self, before: set[tuple[int, int]]) -> None:
        with self._cv:
            self._queue.append(before)
            if not self._busy:
                self._busy = True
                threading.Thread(target=self._run, name="otaro-hugepages", daemon=True).start()

    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._cv:
                if not self._queue:
                    self._busy = False
                    self._cv.notify_all()
                    return
                before = self._queue.pop(0)
            try:
                n = self._collapse(before)
            except Exception:  # advice only: a failure leaves the memory as it was
                n = 0
            with self._cv:
                self.collapsed += n

    def wait(self, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._busy, timeout)
