"""The switch's memory path: packed weights reach onnxruntime through a spill folder, the
session the cache would evict goes before the build, a failed switch restores the precision
before it (otaro.runtime.spill, otaro.runtime.switch, docs/DESIGN.md §7.18)."""

from __future__ import annotations

import errno
import gc
import sys
import threading
import time

import numpy as np
import pytest

from otaro import checkpoint
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.errors import OtaroError
from otaro.export.artifact import ExportConfig, export
from otaro.modules import convert
from otaro.runtime import Runtime
from otaro.runtime import api as rt_api
from otaro.runtime import hugepages
from otaro.runtime import spill as spill_mod
from otaro.runtime import switch as sw

PROMPT = list(range(3, 19))


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """rounding -> artifact. ``midpoint`` at 8 bits has no MatMulNBits container (a 9-bit code):
    that layer keeps its SefpMatMul node, which reads the stored codes from the data file."""
    out = {}
    for i, rounding in enumerate(("trunc", "midpoint")):
        root = tmp_path_factory.mktemp(f"spill-{rounding}")
        checkpoint.save(convert(tiny_model("llama", init_std=0.15, seed=i), f"sefp-g16-{rounding}"), root / "ck",
                        tokenizer=tiny_tokenizer())
        export(ExportConfig(root / "ck", root / "art", accuracy_level=1, validate=False))
        out[rounding] = root / "art"
    return out


@pytest.mark.parametrize("rounding", ["trunc", "midpoint"])
def test_spilled_builds_give_the_same_logits_and_leave_only_the_sparse_data_file(arts, rounding):
    spilled = Runtime.load(arts[rounding], accuracy_level=1, cache_bytes=0)
    in_memory = Runtime.load(arts[rounding], accuracy_level=1, cache_bytes=0, spill=False)
    assert in_memory._spill is None
    folder = spilled._spill.folder
    for b in (8, 3, 2):
        spilled.set_precision(b)
        in_memory.set_precision(b)
        np.testing.assert_array_equal(spilled.logits(PROMPT), in_memory.logits(PROMPT))
        # each build's file is gone once its session exists; only the sparse copy stays
        assert [p.name for p in folder.iterdir()] == [spilled.master.data_name]
    # The sparse copy holds the ranges the graphs point at, byte for byte, and zeros elsewhere.
    data = np.fromfile(folder / spilled.master.data_name, np.uint8)
    master = spilled.master.data
    assert data.size == master.size
    covered = np.zeros(master.size, bool)
    for off, n in spilled._spill._written:
        covered[off:off + n] = True
        np.testing.assert_array_equal(data[off:off + n], master[off:off + n])
    assert covered.any() and not data[~covered].any()
    if rounding == "midpoint":  # the kept SefpMatMul at 8 bits read its codes from the copy
        layer = next(iter(spilled.master.layers.values()))
        off = layer.mantissa.ctypes.data - master.ctypes.data
        assert covered[off:off + layer.mantissa.nbytes].all()
    del spilled
    gc.collect()
    assert not folder.exists()  # removed with the runtime


def test_an_unwritable_spill_folder_falls_back_to_memory_with_a_warning(arts, monkeypatch):
    ref = Runtime.load(arts["trunc"], accuracy_level=1, bits=3, spill=False).logits(PROMPT)
    rt = Runtime.load(arts["trunc"], accuracy_level=1)
    folder = rt._spill.folder

    def full(self, buf, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_mod.BuildFile, "write", full)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        rt.set_precision(3)
    assert rt._spill is None and not folder.exists()
    np.testing.assert_array_equal(rt.logits(PROMPT), ref)

    def no_tmp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(spill_mod.tempfile, "mkdtemp", no_tmp)
    with pytest.warns(RuntimeWarning, match="Read-only file system"):
        rt = Runtime.load(arts["trunc"], accuracy_level=1, bits=3)
    assert rt._spill is None
    np.testing.assert_array_equal(rt.logits(PROMPT), ref)


def test_the_session_the_cache_would_evict_goes_before_the_build(arts, monkeypatch):
    """Under a budget that cannot keep the old precision, it is let go before the new one is
    built (the build never runs beside it); with room, it stays warm through the build."""
    seen = []
    build = Runtime._build

    def spy(self, bits):
        seen.append((self._active_entry is None, list(self._cache.keys)))
        return build(self, bits)

    monkeypatch.setattr(Runtime, "_build", spy)
    rt = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0)
    rt.set_precision(4)
    assert seen[-1] == (True, [])
    rt = Runtime.load(arts["trunc"], accuracy_level=1)  # the default budget keeps both
    rt.set_precision(4)
    assert seen[-1] == (False, [(8,) * len(rt.layers)])


def test_a_failed_switch_restores_the_precision_before_it(arts, monkeypatch):
    rt = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0)
    at8 = rt.logits(PROMPT)
    real = rt_api.create_session
    calls = []

    def fail_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected onnxruntime failure")
        return real(*a, **k)

    monkeypatch.setattr(rt_api, "create_session", fail_once)
    with pytest.raises(OtaroError, match="injected onnxruntime failure"):
        rt.set_precision(3)
    assert len(calls) == 2  # the failed build, then the old precision rebuilt (it had been let go)
    assert rt.active_precision.uniform == 8
    np.testing.assert_array_equal(rt.logits(PROMPT), at8)

    def fail(*a, **k):
        raise RuntimeError("injected onnxruntime failure")

    monkeypatch.setattr(rt_api, "create_session", fail)
    with pytest.raises(OtaroError, match="injected"):
        rt.set_precision(3)
    with pytest.raises(OtaroError, match="no precision is active"):  # not an AttributeError
        rt.logits(PROMPT)
    monkeypatch.setattr(rt_api, "create_session", real)
    rt.set_precision(8)
    np.testing.assert_array_equal(rt.logits(PROMPT), at8)


def test_a_request_during_a_switch_that_let_the_old_session_go_waits_for_it(arts, monkeypatch):
    ref = Runtime.load(arts["trunc"], accuracy_level=1, bits=3).logits(PROMPT)
    building = threading.Event()
    build = Runtime._build

    def slow(self, bits):
        if bits[0] == 3:
            building.set()
            time.sleep(0.3)
        return build(self, bits)

    monkeypatch.setattr(Runtime, "_build", slow)  # before load: the cache holds the bound method
    rt = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0)
    t = threading.Thread(target=rt.set_precision, args=(3,))
    t.start()
    assert building.wait(10)
    got = rt.logits(PROMPT)  # the old session is gone: this waits and runs on the new one
    t.join()
    np.testing.assert_array_equal(got, ref)


def test_big_blocks_are_mapped_while_a_session_builds_unless_the_user_chose(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))

        def malloc_trim(self, pad):
            pass

    monkeypatch.setattr(sw, "_LIBC", FakeLibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with sw.big_blocks_mapped():
        assert calls == [(sw.M_MMAP_THRESHOLD, 1 << 20)]
    assert calls[-1] == (sw.M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling: packing stays on the heap
    with pytest.raises(RuntimeError), sw.big_blocks_mapped():  # restored when the build fails too
        raise RuntimeError
    assert len(calls) == 4 and calls[-1] == (sw.M_MMAP_THRESHOLD, 32 << 20)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    with sw.big_blocks_mapped():
        pass
    assert len(calls) == 4


@pytest.mark.parametrize("spill", [True, False])
def test_layers_packed_in_column_slices_give_the_same_logits(arts, monkeypatch, spill):
    """A pool task packs at most PACK_CHUNK_BYTES of stored code (a slice of a layer's output
    columns, so a big head is spread over the threads): cut into the smallest slices, every
    precision's logits are the same as with whole layers."""
    whole = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0, spill=spill)
    def tasks():
        return sum(len(sw._column_chunks(n, layer)) for n, layer in whole.master.layers.items())

    assert tasks() == len(whole.master.layers)  # tiny layers: one task each
    monkeypatch.setattr(sw, "PACK_CHUNK_BYTES", 1)  # 16 columns a task, the least
    sliced = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0, spill=spill)
    assert tasks() > 2 * len(whole.master.layers)  # layers really were cut
    for b in (8, 3, 2):
        whole.set_precision(b)
        sliced.set_precision(b)
        np.testing.assert_array_equal(sliced.logits(PROMPT), whole.logits(PROMPT))


def test_huge_pages_move_in_the_background_and_can_be_turned_off(arts, monkeypatch):
    asked = []
    monkeypatch.setattr(hugepages, "collapse_new", lambda before: asked.append(before) or 0)
    on = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0)
    on.set_precision(3)
    assert on.wait_for_huge_pages(10) and len(asked) == 2  # the build at load, then the switch's
    if sys.platform.startswith("linux"):  # /proc/self/maps: the mappings before each build
        assert all(isinstance(b, set) and b for b in asked)
    off = Runtime.load(arts["trunc"], accuracy_level=1, cache_bytes=0, huge_pages=False)
    off.set_precision(3)
    assert off.wait_for_huge_pages(10) and len(asked) == 2
    np.testing.assert_array_equal(on.logits(PROMPT), off.logits(PROMPT))


def test_writes_without_pwrite_seek_and_write(tmp_path, monkeypatch):
    """Windows has no os.pwrite: the spill file is written with seek + write instead."""
    monkeypatch.delattr(spill_mod.os, "pwrite")
    f = spill_mod.BuildFile(tmp_path / "~packed-1.bin")
    a, b = f.reserve(10), f.reserve(3)
    f.write(np.arange(3, dtype=np.uint8), b)
    f.write(np.arange(10, dtype=np.uint8) + 100, a)
    f.close()
    data = (tmp_path / "~packed-1.bin").read_bytes()
    assert b == spill_mod.ALIGN and len(data) == b + 3
    assert data[:10] == bytes(range(100, 110)) and data[b:] == bytes([0, 1, 2]) and not any(data[10:b])
