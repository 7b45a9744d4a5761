"""Huge pages for a session's weights (otaro.runtime.hugepages)."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from otaro.runtime import hugepages as hp

MAPS = """\
55d0c0a00000-55d0c0c21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000600000 rw-p 00000000 00:00 0
7f0000600000-7f0000800000 ---p 00000000 00:00 0
7f1000000000-7f1000100000 r--p 00000000 fd:01 1234                       /usr/lib/libc.so.6
7f2000000000-7f2000400000 rw-p 00000000 fd:01 99                         /tmp/otaro-spill/~packed-1.bin
7f3000000000-7f3000400000 rw-s 00000000 00:05 7                          /dev/zero (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_private_writable_anonymous_mappings_and_whole_huge_spans():
    ranges = hp.anonymous_ranges(MAPS)
    assert ranges == {(0x55D0C0A00000, 0x55D0C0C21000), (0x7F0000000000, 0x7F0000600000)}
    # the heap holds one whole 2 MiB span (its start is aligned, its end is not); the mapping
    # of 6 MiB holds three; an unaligned range shorter than a span holds none
    assert hp.huge_spans(ranges | {(0x1000, 0x201000)}) == [
        (0x55D0C0A00000, 0x55D0C0C00000), (0x7F0000000000, 0x7F0000600000)]


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text else ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_new_mapping_is_collapsed_into_huge_pages():
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip("transparent huge pages are off on this machine")
    before = hp.anonymous_ranges()
    m = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        a = np.frombuffer(m, np.uint8)
        a[::4096] = 1  # resident on 4 KiB pages
        start = a.ctypes.data
        asked = hp.collapse_new(before)
        assert asked >= 14 << 20  # the 16 MiB mapping's whole 2 MiB spans (7 or 8 of them)
        smaps = Path("/proc/self/smaps").read_text().split("\n")
        head = next(i for i, line in enumerate(smaps) if line.startswith(f"{start:x}-"))
        huge = next(int(line.split()[1]) for line in smaps[head:head + 30] if line.startswith("AnonHugePages:"))
        if huge == 0:
            pytest.skip("the kernel declined to collapse (an old kernel without MADV_COLLAPSE, or no free huge pages)")
        assert huge >= 2048  # kB: at least one 2 MiB page
        assert (a[::4096] == 1).all()  # the contents moved with it
        del a
    finally:
        m.close()


def test_the_collapser_runs_queued_builds_in_order_and_waits(monkeypatch):
    import threading

    seen, gate = [], threading.Event()

    def fake(before):
        gate.wait(5)
        seen.append(before)
        return 1 << 21

    monkeypatch.setattr(hp, "collapse_new", fake)
    c = hp.Collapser()
    c.submit({(1, 2)})
    c.submit({(3, 4)})
    assert not c.wait(0.05)  # still running
    gate.set()
    assert c.wait(5) and seen == [{(1, 2)}, {(3, 4)}] and c.collapsed == 2 << 21
    c.submit(set())  # a new thread once the last one finished
    assert c.wait(5) and len(seen) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_collapser_thread_yields_the_cpu(monkeypatch):
    """Moving pages is never urgent: the thread runs at nice 19, so it takes the cores only when
    the request it would slow does not need them."""
    import os
    import threading

    nice = []
    monkeypatch.setattr(hp, "collapse_new", lambda before: nice.append(
        os.getpriority(os.PRIO_PROCESS, threading.get_native_id())) or 0)
    c = hp.Collapser()
    c.submit(set())
    assert c.wait(5) and nice == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # only that thread
