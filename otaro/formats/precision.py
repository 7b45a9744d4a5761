"""Rules of per-layer precision specs shared by the torch modules and the torch-free runtime."""

from __future__ import annotations

import fnmatch


def reaches_head(pattern: str, name: str, short: str) -> bool:
    """Whether a precision pattern addresses a quantized LM head (otaro.head): it must match the
    head's name and not begin with a wildcard, so ``*`` and ``*proj`` mean decoder layers and
    ``lm_head`` means the head."""
    if pattern[:1] in ("*", "?", "["):
        return False
    return fnmatch.fnmatchcase(short, pattern) or fnmatch.fnmatchcase(name, pattern)
