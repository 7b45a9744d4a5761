"""Where a precision's packed weights wait for onnxruntime: a private folder of files.

A session built from in-memory external data (``add_external_initializers_from_files_in_memory``)
copies every tensor into its own buffers before it prepacks the MatMulNBits weights, so during
``InferenceSession()`` the process holds our packed arrays, onnxruntime's copy of them and the
prepacked layout at once: three times the precision's weights (docs/DESIGN.md §7.18). Written
to a file instead, each layer's packed bytes are freed as soon as they are written (a pool
thread holds one layer at a time), and onnxruntime maps the file and reads each weight once
while it prepacks it, then drops the mapping. So a build peaks at about the finished session's
size, and the session itself ends smaller (onnxruntime's arena keeps none of the copies).

The folder (``tempfile.mkdtemp``: mode 0700, under ``$TMPDIR``) lives as long as the
:class:`Spill` and holds:

* a sparse file named like the artifact's data file, holding only the byte ranges the built
  graphs point at (the shared float tensors, which sessions borrow anyway, and any layer kept
  as ``SefpMatMul``): the graph's external references stay as the exporter wrote them;
* one file per build (``~packed-N.bin``; ``~`` never appears in an artifact file name), removed
  once the session exists (onnxruntime keeps its mappings alive past the unlink).

Nothing here is read back by this process: the files are onnxruntime's input only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

# Offsets of the tensors in a build's file: a multiple of the largest mapping granularity
# (Windows maps at 64 KiB) so onnxruntime can map each tensor at its own offset. The gaps are
# holes: they take no disk and no memory.
ALIGN = 1 << 16


_SEEK_LOCK = threading.Lock()  # where os.pwrite is missing (Windows): seek + write, one at a time


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(buf)).cast("B")
    while view:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:
            with _SEEK_LOCK:
                os.lseek(fd, offset, os.SEEK_SET)
                n = os.write(fd, view)
        view, offset = view[n:], offset + n


class BuildFile:
    """One build's packed weights: slots reserved up front, filled by pool threads (``pwrite``
    needs no lock: slots do not overlap). Opened in binary mode where that exists (Windows)."""

    def __init__(self, path: Path):
        self.path, self.size = path, 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)

    def reserve(self, nbytes: int) -> int:
        offset = -(-self.size // ALIGN) * ALIGN
        self.size = offset + nbytes
        return offset

    def write(self, buf: np.ndarray, offset: int) -> None:
        _pwrite_all(self._fd, buf, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, self.size)  # a trailing reservation may be unwritten so far
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Spill:
    """The folder of one :class:`otaro.runtime.api.Runtime` (see the module docstring)."""

    def __init__(self, data: np.ndarray, data_name: str, parent: str | os.PathLike | None = None):
        if Path(data_name).name != data_name or data_name.startswith("~"):
            raise ValueError(f"data file name {data_name!r} must be a bare name")
        self.folder = Path(tempfile.mkdtemp(prefix="otaro-spill-", dir=parent))
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._data, self._data_name = data, data_name
        self._written: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._count = 0
        try:
            fd = os.open(self.folder / data_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o600)
            try:
                os.ftruncate(fd, data.size)  # sparse: every offset of the artifact is valid
            finally:
                os.close(fd)
        except OSError:
            self.close()
            raise

    def cover(self, ranges) -> None:
        """Write these (offset, length) ranges of the artifact's data file, once each."""
        with self._lock:
            todo = sorted(set(ranges) - self._written)
            if not todo:
                return
            fd = os.open(self.folder / self._data_name, os.O_WRONLY | getattr(os, "O_BINARY", 0))
            try:
                for off, n in todo:
                    _pwrite_all(fd, self._data[off:off + n], off)
            finally:
                os.close(fd)
            self._written.update(todo)

    def new_file(self) -> BuildFile:
        with self._lock:
            self._count += 1
            return BuildFile(self.folder / f"~packed-{self._count}.bin")

    def close(self) -> None:
        """Remove the folder now (it is removed at garbage collection or exit otherwise)."""
        self._remove()
