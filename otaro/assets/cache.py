"""Where prepared benchmark assets live, and the error raised when one cannot be had.

Benchmark assets (a real model, real text) are too big to commit and are fetched from package
registries, so they are prepared once into a per-user cache and reused. ``OTARO_CACHE`` moves
the cache (CI, a scratch disk, tests); the default follows the XDG habit of ``~/.cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

from otaro.errors import OtaroError

CACHE_ENV = "OTARO_CACHE"


class AssetUnavailable(OtaroError):
    """A benchmark asset that cannot be prepared here; the message says what to install or run."""


def cache_dir() -> Path:
    """Return the asset cache folder (``$OTARO_CACHE`` or ``~/.cache/otaro``), creating it."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "otaro"
    path.mkdir(parents=True, exist_ok=True)
    return path
