"""The C library, loaded once through ctypes, for the memory calls the runtime makes (glibc's
``malloc_trim``/``mallopt`` in otaro.runtime.switch, ``madvise``/``mincore`` in
otaro.runtime.hugepages). Each caller checks for the functions it needs."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
    """The C library (``errno`` kept for ctypes.get_errno), or None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
