"""The reference of ``otaro eval``'s fidelity metrics (KLD, top-1): which model it is, whether it
fits the evaluated model, and its log-probs per window, computed once and reused by every
(format, bits) row.

Default reference: for an unquantized model quantized on the fly, the model itself; for a
checkpoint, the ``source.model`` its manifest records, when that still loads here (otherwise
the metrics are skipped with a note, not an error: the checkpoint may have travelled without
its source).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from otaro.errors import OtaroError
from otaro.evaluation.data import Windows

# Above this many bytes of float32 log-probs the cache goes to numpy memmaps on disk: a 49k
# vocabulary x 512 tokens x 40 windows is ~4 GB per text, more than we want resident.
MEMMAP_BYTES = 2 << 30


class ReferenceMismatch(OtaroError):
    """A reference model whose vocabulary or tokenizer differs from the evaluated model's."""


@dataclass(frozen=True)
class Reference:
    model: Any | None  # None: no fidelity metrics
    name: str | None
    origin: str  # "option" (--reference) | "manifest" | "self" | "none"
    note: str | None = None  # why the metrics are skipped, for the user

    @property
    def is_self(self) -> bool:
        return self.origin == "self"


def vocab_size(model) -> int | None:
    """Width of the model's logits: the output embedding's rows, else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = getattr(head, "out_features", None)
    return n if n is not None else getattr(model.config, "vocab_size", None)


def _peek_vocab(spec: str) -> int | None:
    """``vocab_size`` from a folder's config.json, to refuse a mismatch before loading weights."""
    cfg = Path(spec) / "config.json"
    try:
        n = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size") if cfg.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # load_source reports a broken folder in its own words
    return n if isinstance(n, int) else None


def _mismatch(name: str, n_ref, n_model, what: str) -> ReferenceMismatch:
    return ReferenceMismatch(f"reference model {name} has vocabulary {n_ref}, {what} has {n_model}; "
                             "KLD needs the same vocabulary (pass another --reference, or --no-reference)")


def check_compatible(name: str, ref_model, ref_tokenizer, model, tokenizer, what: str = "the model") -> None:
    """Same logits width and, when the reference has a tokenizer, the same tokens."""
    n_ref, n_model = vocab_size(ref_model), vocab_size(model)
    if n_ref != n_model:
        raise _mismatch(name, n_ref, n_model, what)
    if ref_tokenizer is None or tokenizer is None:
        return  # nothing to compare: the windows are tokenized with the evaluated model's tokenizer
    if len(ref_tokenizer) != len(tokenizer):
        raise ReferenceMismatch(f"reference model {name}'s tokenizer has {len(ref_tokenizer)} tokens, "
                                f"{what}'s has {len(tokenizer)}; KLD needs the same tokenizer")
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ReferenceMismatch(f"reference model {name}'s tokenizer maps tokens differently from {what}'s "
                                "(same size, other vocabulary); KLD needs the same tokenizer")


def _load(spec: str, origin: str, src) -> Reference:
    from otaro.sources import load_source

    what = "the checkpoint" if src.kind == "checkpoint" else "the model"
    n_peek = _peek_vocab(spec)
    if n_peek is not None and n_peek != vocab_size(src.model):
        raise _mismatch(spec, n_peek, vocab_size(src.model), what)
    try:
        ref = load_source(spec)
    except OtaroError as e:
        if origin == "option":
            raise
        return Reference(None, spec, "none", f"reference {spec} (the checkpoint's source) does not load here "
                                             f"({e}); KLD/top-1 skipped, pass --reference MODEL")
    check_compatible(spec, ref.model, ref.tokenizer, src.model, src.tokenizer, what)
    return Reference(ref.model.eval(), spec, origin)


def resolve(spec: str | None, enabled: bool, src, model_spec: str) -> Reference:
    """The reference for evaluating ``src`` (loaded from ``model_spec``), checked up front."""
    if not enabled:
        return Reference(None, None, "none")
    if src.kind != "checkpoint" and spec in (None, model_spec):
        return Reference(src.model, src.name, "self")
    if spec is not None:
        return _load(spec, "option", src)
    from otaro import checkpoint

    recorded = (checkpoint.read_manifest(src.path).get("source") or {}).get("model")
    if not isinstance(recorded, str) or not recorded:
        return Reference(None, None, "none", "the checkpoint records no source model; KLD/top-1 skipped, "
                                             "pass --reference MODEL")
    return _load(recorded, "manifest", src)


class LogprobCache:
    """Reference log-softmax per text, float32 ``[windows, seq_len - 1, vocab]``: in memory, or
    numpy memmaps in a temporary folder when all texts together pass ``memmap_bytes``. Use as a
    context manager; leaving it deletes the folder."""

    def __init__(self, shapes: Sequence[tuple[int, int, int]], memmap_bytes: int | None = None):
        memmap_bytes = MEMMAP_BYTES if memmap_bytes is None else memmap_bytes
        total = sum(math.prod(s) for s in shapes) * 4
        self.dir: Path | None = Path(tempfile.mkdtemp(prefix="otaro-eval-ref-")) if total > memmap_bytes else None
        try:
            self.arrays = [
                np.memmap(self.dir / f"text{i}.f32", dtype=np.float32, mode="w+", shape=s) if self.dir
                else np.empty(s, dtype=np.float32)
                for i, s in enumerate(shapes)
            ]
        except BaseException:
            self.close()
            raise

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i]

    def close(self) -> None:
        self.arrays = []  # drop the memmaps before their files
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> LogprobCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compute(model, windows: Sequence[Windows], batch_size: int, progress=None, memmap_bytes: int | None = None):
    """(cache, [Score of the reference itself per text]): one forward pass per window, ever."""
    from otaro.evaluation.metrics import score

    n_vocab = vocab_size(model)
    shapes = [(len(w.tokens), w.tokens.shape[1] - 1, n_vocab) for w in windows]
    cache = LogprobCache(shapes, MEMMAP_BYTES if memmap_bytes is None else memmap_bytes)
    try:
        scores = [score(model, w, batch_size, progress, record=cache[i]) for i, w in enumerate(windows)]
    except BaseException:
        cache.close()
        raise
    return cache, scores
