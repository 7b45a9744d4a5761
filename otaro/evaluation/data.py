"""Evaluation text -> fixed token windows.

Windows are non-overlapping, ``seq_len`` tokens each, tokenized without special tokens (a chat
model's BOS would otherwise be scored as text). A model that expects a BOS at every sequence
start (``otaro.tokens.leading_bos``: its tokenizer adds one) reads ``[BOS] + window``; the
BOS position is not scored, so the windows and the scored targets are the same either way. When ``max_windows`` caps the count, windows are
taken evenly spaced across the whole text rather than from its start, so a capped run still
samples every part of a corpus (all Brown genres k–r, all six Austen novels). Deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from otaro.errors import OtaroError


@dataclass(frozen=True)
class Windows:
    name: str
    tokens: torch.Tensor  # int64 [n, seq_len]
    predicted_bytes: tuple[int, ...]  # UTF-8 bytes of tokens 1..seq_len-1 of each window
    total_tokens: int  # tokens in the whole text (before capping)
    bos_id: int | None = None  # read before every window (never scored) when the model expects one

    def model_inputs(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """What the model reads for windows ``start:stop``: ``[b, seq_len]``, or ``[b, 1 + seq_len]``
        with the BOS first. Position ``-seq_len + t`` of its logits predicts token ``t + 1``."""
        rows = self.tokens[start:stop]
        if self.bos_id is None:
            return rows
        return torch.cat([torch.full((len(rows), 1), self.bos_id, dtype=rows.dtype), rows], dim=1)


def _read_utf8(path: Path) -> str:
    """One file of a text folder; a non-UTF-8 file is named (a folder may hold hundreds)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OtaroError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def read_text(name: str) -> tuple[str, str]:
    """(label, text) from ``corpus:NAME`` / a registered corpus name, or a UTF-8 text file."""
    corpus = name[len("corpus:"):] if name.startswith("corpus:") else name
    path = Path(name)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise OtaroError(f"{path} is not UTF-8 text") from None
        label = path.stem
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise OtaroError(f"{path} holds no .txt files")
        text = "\n\n".join(_read_utf8(p) for p in files)
        label = path.name
    else:
        from otaro.assets.corpora import corpus_names, load_corpus

        if corpus not in corpus_names():
            raise OtaroError(f"{name}: no such text file, and not a corpus ({', '.join(corpus_names())})")
        text, label = load_corpus(corpus), corpus
    if not text.strip():
        raise OtaroError(f"{name} is empty")
    return label, text


def make_windows(tokenizer, text: str, seq_len: int, max_windows: int | None, name: str = "text",
                 max_positions: int | None = None) -> Windows:
    if seq_len < 2:
        raise OtaroError(f"sequence length must be at least 2 (got {seq_len})")
    from otaro.tokens import leading_bos

    bos = leading_bos(tokenizer)
    if max_positions is not None and seq_len + (bos is not None) > max_positions:
        with_bos = " plus its BOS" if bos is not None else ""
        raise OtaroError(f"sequence length {seq_len}{with_bos} is larger than the model allows ({max_positions})")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < seq_len:
        raise OtaroError(f"{name} has only {len(ids)} tokens, fewer than one window of {seq_len}; use --seq-len {max(2, len(ids))} or more text")
    n = len(ids) // seq_len
    starts = [i * seq_len for i in range(n)]
    if max_windows is not None and n > max_windows:
        # evenly spaced window indices, first and last included
        picks = sorted({round(i * (n - 1) / max(1, max_windows - 1)) for i in range(max_windows)})
        starts = [starts[i] for i in picks]
    tokens = torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)
    nbytes = tuple(len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in tokens)
    return Windows(name, tokens, nbytes, len(ids), bos)
