"""Training data for ``otaro finetune``: sources -> examples -> packed blocks -> batch order.

The pipeline, and why each step is the way it is:

* **Sources** (``load_examples``) are read by a loader chosen from a registry keyed by *kind*
  (``txt``, ``jsonl``, ``folder``, ``hf-dataset``, ``corpus``), so a new format is one
  registered function, not another branch. Every user mistake (missing path, empty data, bad
  UTF-8, a bad JSONL line) is an ``OtaroError`` naming the file, and the line for JSONL.
* **Text is split into paragraphs** (blank-line separated; a text with no blank line at all is
  taken one line per paragraph, which is how the prepared Brown corpus is laid out). One example
  per paragraph, for ``.txt`` files as well as corpora, so that a single big file still gives a
  held-out split at example level instead of one indivisible example.
* **Packing** (``pack``) concatenates examples, each followed by EOS, and cuts the stream into
  full ``seq_len`` blocks: no padding, so every position trains. Blocks may span example
  boundaries (the usual causal-LM packing; the EOS marks the boundary). Labels are aligned with
  the inputs, Hugging Face style: ``labels[t] == input_ids[t]`` and the model shifts them
  internally; prompt tokens of prompt/response examples get ``-100`` so only the response (and
  its EOS) is learned. A model that expects a BOS at every sequence start (its tokenizer adds
  one, ``otaro.tokens.leading_bos``) gets it first in every block, then ``seq_len - 1`` tokens
  of the stream: it is trained on sequences shaped like the ones it was pre-trained on.
* **Splits** (``build_splits``) hold out whole examples, chosen by a seeded shuffle, so no
  held-out paragraph is ever seen in training, and the same data and seed give the same split.
* **Batch order** (``BatchOrder``) is a seeded permutation per epoch over the train blocks,
  consumed ``B`` (global batch) at a time; its state is a small JSON-able dict, so a resumed
  run sees exactly the batches an uninterrupted run would, on any number of processes.
"""

from __future__ import annotations

import json
import os
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from otaro.errors import OtaroError

IGNORE_INDEX = -100  # the label value Hugging Face causal-LM losses skip
_TOKENIZE_CHUNK = 1024  # examples per tokenizer call: batched for speed, bounded for memory


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """Plain ``text``, or a ``prompt``/``response`` pair (loss on the response only).

    ``source`` says where it came from (``file:line``, ``folder[row]``, ``corpus:NAME:line``)
    so a surprising example can be traced back.
    """

    text: str | None
    prompt: str | None
    response: str | None
    source: str

    def __post_init__(self):
        is_text = self.text is not None and self.prompt is None and self.response is None
        is_pair = self.text is None and self.prompt is not None and self.response is not None
        if not (is_text or is_pair):
            raise ValueError("an Example is either text, or prompt and response")

    @property
    def is_pair(self) -> bool:
        return self.text is None


def plain(text: str, source: str) -> Example:
    return Example(text, None, None, source)


def pair(prompt: str, response: str, source: str) -> Example:
    return Example(None, prompt, response, source)


# --------------------------------------------------------------------------------------------
# Source registry
# --------------------------------------------------------------------------------------------

Loader = Callable[[str], list[Example]]
SOURCES: dict[str, Loader] = {}  # kind -> loader(path or spec) -> examples (maybe empty)
FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl"}  # file suffix -> kind (also what folders read)
CORPUS_PREFIX = "corpus:"


def register_source(kind: str) -> Callable[[Loader], Loader]:
    """Decorator: make ``fn`` the loader of ``kind`` (a new format is one function)."""

    def deco(fn: Loader) -> Loader:
        SOURCES[kind] = fn
        return fn

    return deco


def source_kind(spec: str) -> str:
    """Which loader reads ``spec``; a missing path or unknown file type is a user error."""
    if spec.startswith(CORPUS_PREFIX):
        return "corpus"
    path = Path(spec)
    if path.is_dir():
        return "hf-dataset" if _is_saved_dataset(path) else "folder"
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            known = ", ".join(FILE_KINDS)
            raise OtaroError(f"{path}: unknown file type {path.suffix or '(none)'!r}; expected {known}, "
                             f"a folder, a saved Hugging Face dataset or {CORPUS_PREFIX}NAME")
        return kind
    raise OtaroError(f"{spec}: no such file or folder{_corpus_hint(spec)}")


def load_examples(paths: Sequence[str]) -> list[Example]:
    """All examples of all ``paths``, in the order given (each source in a fixed order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise OtaroError("no training data given")
    examples: list[Example] = []
    for spec in paths:
        found = SOURCES[source_kind(spec)](spec)
        if not found:
            raise OtaroError(f"{spec} is empty")
        examples.extend(found)
    return examples


def _corpus_hint(spec: str) -> str:
    """Suggest ``corpus:NAME`` when a bare corpus name was given as a path."""
    from otaro.assets.corpora import corpus_names

    return f" (did you mean {CORPUS_PREFIX}{spec}?)" if spec in corpus_names() else ""


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def paragraphs(text: str) -> Iterator[tuple[int, str]]:
    """(1-based first line, paragraph) of ``text``, split on blank lines.

    A text with several lines but no blank line is split one line per paragraph: that is the
    layout of the prepared Brown corpus, and otherwise it would be one indivisible example.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            if not current:
                blocks.append((number, current))
            current.append(line)
        elif current:
            current = []
    if len(blocks) == 1 and len(blocks[0][1]) > 1:
        first = blocks[0][0]
        blocks = [(first + i, [line]) for i, line in enumerate(blocks[0][1]) if line.strip()]
    for number, block in blocks:
        yield number, "\n".join(block)


def _text_examples(text: str, label: str) -> list[Example]:
    return [plain(p, f"{label}:{n}") for n, p in paragraphs(text)]


@register_source("txt")
def _load_txt(spec: str) -> list[Example]:
    """A UTF-8 text file: one example per paragraph."""
    data = Path(spec).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OtaroError(f"{spec} is not UTF-8 text (bad byte at offset {e.start})") from None
    return _text_examples(text, spec)


@register_source("jsonl")
def _load_jsonl(spec: str) -> list[Example]:
    """JSON Lines: ``{"text": ...}`` or ``{"prompt": ..., "response"|"completion": ...}``."""
    data = Path(spec).read_bytes().removeprefix(b"\xef\xbb\xbf")
    examples = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{spec}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise OtaroError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OtaroError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        example = _record_example(obj, where)
        if example is not None:
            examples.append(example)
    return examples


def _record_example(obj, where: str) -> Example | None:
    """One JSON object / dataset row -> an Example; None for an empty one (skipped, like a blank line)."""
    if not isinstance(obj, dict):
        raise OtaroError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    response = obj.get("response", obj.get("completion"))
    if "prompt" in obj and response is not None:
        prompt = _string(obj["prompt"], "prompt", where)
        response = _string(response, "response", where)
        return pair(prompt, response, where) if response else None
    if "text" in obj:
        text = _string(obj["text"], "text", where)
        return plain(text, where) if text.strip() else None
    raise OtaroError(f'{where}: no usable fields (need "text", or "prompt" with "response" or '
                     f'"completion"; found {", ".join(map(repr, obj)) or "none"})')


def _string(value, field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OtaroError(f'{where}: "{field}" must be a string, not {type(value).__name__}')
    return value


@register_source("folder")
def _load_folder(spec: str) -> list[Example]:
    """Every .txt/.jsonl file below ``spec`` (recursive, sorted, hidden paths skipped)."""
    root = Path(spec)
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in FILE_KINDS and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise OtaroError(f"{spec} holds no {' or '.join(FILE_KINDS)} files")
    examples = []
    for path in files:  # an empty file inside a folder is skipped; an empty folder is not
        examples.extend(SOURCES[FILE_KINDS[path.suffix.lower()]](str(path)))
    return examples


@register_source("hf-dataset")
def _load_hf_dataset(spec: str) -> list[Example]:
    """A ``save_to_disk`` folder (a DatasetDict gives its "train" split); ``datasets`` is optional."""
    try:
        import datasets
    except ImportError:
        raise OtaroError(f"{spec} is a saved Hugging Face dataset; reading it needs `pip install datasets`") from None
    if _saved_without_rows(Path(spec)):
        return []  # datasets cannot load an empty saved Dataset (it has no data file)
    try:
        ds = datasets.load_from_disk(spec)
    except (FileNotFoundError, ValueError, OSError, IndexError) as e:
        raise OtaroError(f"{spec}: cannot read the saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise OtaroError(f"{spec} has no \"train\" split (splits: {', '.join(ds) or 'none'})")
        ds = ds["train"]
    return _dataset_examples(ds, spec)


def _saved_without_rows(path: Path) -> bool:
    """True for a saved Dataset (or a DatasetDict's "train") that holds no data file at all."""
    state = path / "state.json" if (path / "state.json").is_file() else path / "train" / "state.json"
    try:
        return json.loads(state.read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # let load_from_disk say what is wrong


def _dataset_examples(ds, spec: str) -> list[Example]:
    columns = set(ds.column_names)
    response = "response" if "response" in columns else "completion"
    if "prompt" in columns and response in columns:
        names = ["prompt", response]
    elif "text" in columns:
        names = ["text"]
    else:
        raise OtaroError(f'{spec}: no usable columns (need "text", or "prompt" with "response" or '
                         f'"completion"; found {", ".join(ds.column_names) or "none"})')
    rows = zip(*(ds[name] for name in names))
    examples = (_record_example(dict(zip(names, row)), f"{spec}[{i}]") for i, row in enumerate(rows))
    return [e for e in examples if e is not None]


@register_source("corpus")
def _load_corpus(spec: str) -> list[Example]:
    """A registered corpus (prepared offline on first use): one example per paragraph."""
    from otaro.assets import corpora

    name = spec[len(CORPUS_PREFIX):]
    return _text_examples(corpora.load_corpus(name), spec)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBlocks:
    """``input_ids`` and ``labels``, int64 ``[n, seq_len]``; labels aligned with inputs (HF style:
    the model shifts them), ``-100`` on prompt tokens."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def masked_fraction(self) -> float:
        """Share of positions that carry no loss (prompt tokens)."""
        if self.labels.numel() == 0:
            return 0.0
        return float((self.labels == IGNORE_INDEX).float().mean())


def pack(tokenizer, examples: Sequence[Example], seq_len: int, eos_id: int) -> PackedBlocks:
    """Tokenize, append EOS to each example, concatenate, cut into full ``seq_len`` blocks.

    The tail shorter than a block is dropped (no padding: every position trains).
    """
    from otaro.tokens import leading_bos

    _check_seq_len(seq_len)
    ids, labels = token_stream(tokenizer, examples, eos_id)
    return _blocks(ids, labels, seq_len, leading_bos(tokenizer))


def token_stream(tokenizer, examples: Sequence[Example], eos_id: int) -> tuple[array, array]:
    """(ids, labels) of all examples back to back, each followed by ``eos_id``.

    Prompt and response are tokenized separately, as at generation time where the prompt is
    tokenized alone; prompt tokens get label ``-100``, the response and the EOS keep theirs.
    """
    if not isinstance(eos_id, int) or isinstance(eos_id, bool):
        raise OtaroError(f"end-of-sequence token id must be an integer (got {eos_id!r})")
    ids, labels = array("q"), array("q")
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        for prompt, body in _tokenize_chunk(tokenizer, examples[start : start + _TOKENIZE_CHUNK]):
            ids.extend(prompt)
            labels.extend([IGNORE_INDEX] * len(prompt))
            ids.extend(body)
            labels.extend(body)
            ids.append(eos_id)
            labels.append(eos_id)
    return ids, labels


def _tokenize_chunk(tokenizer, chunk: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """(masked prompt ids, trained ids) per example, with one batched tokenizer call per field."""
    prompts = _tokenize(tokenizer, [e.prompt if e.is_pair else "" for e in chunk])
    bodies = _tokenize(tokenizer, [e.response if e.is_pair else e.text for e in chunk])
    return list(zip(prompts, bodies))


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not any(texts):
        return [[] for _ in texts]
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def _blocks(ids: array, labels: array, seq_len: int, bos_id: int | None = None) -> PackedBlocks:
    """Full blocks of ``seq_len``: ``bos_id`` (if given) then ``seq_len - 1`` stream tokens."""
    body = seq_len - (bos_id is not None)
    n = len(ids) // body
    if n == 0:
        empty = torch.empty((0, seq_len), dtype=torch.long)
        return PackedBlocks(empty, empty.clone())

    def cut(values: array) -> torch.Tensor:
        rows = torch.frombuffer(values, dtype=torch.long)[: n * body].clone().view(n, body)
        if bos_id is None:
            return rows
        # The BOS label is the BOS itself (labels stay aligned with inputs); the model's shift
        # never makes position 0 a target, so it costs no loss and needs no -100.
        return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)

    return PackedBlocks(cut(ids), cut(labels))


def _check_seq_len(seq_len: int, max_positions: int | None = None):
    if not isinstance(seq_len, int) or seq_len < 2:
        raise OtaroError(f"sequence length must be at least 2 (got {seq_len})")
    if max_positions is not None and seq_len > max_positions:
        raise OtaroError(f"sequence length {seq_len} is larger than the model allows ({max_positions})")


# --------------------------------------------------------------------------------------------
# Train / held-out splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    train: PackedBlocks
    heldout: PackedBlocks
    stats: dict  # JSON-able: per split examples, tokens, blocks, dropped tokens, masked fraction


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) example indices: a seeded shuffle, the last fraction held out.

    At least one example on each side when there are two or more and the fraction is not 0.
    Each side is returned in source order so neighbouring paragraphs stay together in a block.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = 0
    if heldout_fraction > 0 and n >= 2:
        n_held = min(n - 1, max(1, round(n * heldout_fraction)))
    return sorted(order[: n - n_held]), sorted(order[n - n_held :])


def build_splits(tokenizer, paths: Sequence[str], seq_len: int, heldout_fraction: float = 0.05,
                 seed: int = 0, max_positions: int | None = None, *,
                 eos_id: int | None = None) -> Splits:
    """Load ``paths``, split whole examples into train / held-out, pack each side.

    Argument errors are raised before any file is read; "data too small" before any training.
    ``eos_id`` defaults to the tokenizer's EOS token.
    """
    _check_seq_len(seq_len, max_positions)
    if not 0 <= heldout_fraction <= 0.5:
        raise OtaroError(f"held-out fraction must be between 0 and 0.5 (got {heldout_fraction})")
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise OtaroError("the tokenizer has no end-of-sequence token to separate examples")
    examples = load_examples(paths)
    train_idx, held_idx = split_indices(len(examples), heldout_fraction, seed)
    if heldout_fraction > 0 and not held_idx:
        raise OtaroError(f"data too small: 1 example cannot be split into train and held-out; "
                         f"add data or use a held-out fraction of 0")
    train, train_stats = _pack_side(tokenizer, [examples[i] for i in train_idx], seq_len, eos_id, "")
    held, held_stats = _pack_side(tokenizer, [examples[i] for i in held_idx], seq_len, eos_id, "held-out ")
    from otaro.tokens import leading_bos

    stats = {"seq_len": seq_len, "heldout_fraction": heldout_fraction, "seed": seed,
             "bos": leading_bos(tokenizer) is not None,  # every block starts with the model's BOS
             "train": train_stats, "heldout": held_stats}
    return Splits(train, held, stats)


def _pack_side(tokenizer, examples: list[Example], seq_len: int, eos_id: int,
               label: str) -> tuple[PackedBlocks, dict]:
    from otaro.tokens import leading_bos

    ids, labels = token_stream(tokenizer, examples, eos_id)
    bos = leading_bos(tokenizer)
    blocks = _blocks(ids, labels, seq_len, bos)
    if examples and len(blocks) == 0:
        raise OtaroError(f"data too small: {len(ids)} {label}tokens for blocks of {seq_len}; "
                         f"lower --seq-len or add data")
    stats = {"examples": len(examples), "tokens": len(ids), "blocks": len(blocks),
             "dropped_tokens": len(ids) - len(blocks) * (seq_len - (bos is not None)),
             "masked_fraction": blocks.masked_fraction}
    return blocks, stats


# --------------------------------------------------------------------------------------------
# Batch order
# --------------------------------------------------------------------------------------------


class BatchOrder:
    """Deterministic, resumable order of train blocks, one GLOBAL batch of ``batch_size`` at a time.

    Epoch ``e`` is ``randperm(n)`` seeded with ``seed + e``; batches are consecutive slices of
    it, running on into the next epoch when one ends (a block never repeats within an epoch).
    The order depends only on (n, batch_size, seed), never on the number of processes: each
    process takes ``shard(batch, rank, world)``, and the shards together are the global batch,
    so a run resumed on a different number of GPUs still sees the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, world: int = 1):
        if n < 1:
            raise OtaroError("no training blocks to draw batches from")
        if batch_size < 1:
            raise OtaroError(f"batch size must be at least 1 (got {batch_size})")
        _check_divisible(batch_size, world)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.n, generator=gen).tolist()
        return self._perm

    def next_global_batch(self) -> list[int]:
        """The next ``batch_size`` block indices (for all processes together)."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.n - self.position)
            batch.extend(self._permutation()[self.position : self.position + take])
            self.position += take
            if self.position == self.n:  # keep position < n, so the state is canonical
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return batch

    @staticmethod
    def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
        """This process's part of a global batch: ``indices[rank::world]`` (equal sizes)."""
        _check_divisible(len(indices), world)
        if not 0 <= rank < world:
            raise OtaroError(f"process rank {rank} is outside 0..{world - 1}")
        return list(indices[rank::world])

    def state_dict(self) -> dict:
        """Plain JSON-able state; ``load_state_dict`` of it continues with the same batches."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict):
        """Continue from ``state``; it must come from the same blocks, batch size and seed."""
        try:
            saved = {k: int(state[k]) for k in ("epoch", "position", "seed", "n", "batch_size")}
        except (KeyError, TypeError, ValueError) as e:
            raise OtaroError(f"resume state of the batch order is malformed ({e!r})") from None
        diffs = [f"{k} is {getattr(self, k)} now but {saved[k]} in the checkpoint"
                 for k in ("n", "batch_size", "seed") if saved[k] != getattr(self, k)]
        if diffs:
            raise OtaroError("resume data does not match: " + "; ".join(diffs))
        if saved["epoch"] < 0 or not 0 <= saved["position"] < self.n:
            raise OtaroError(f"resume state of the batch order is malformed (epoch {saved['epoch']}, "
                             f"position {saved['position']} of {self.n})")
        self.epoch, self.position, self._perm = saved["epoch"], saved["position"], None


shard = BatchOrder.shard


def _check_divisible(batch_size: int, world: int):
    if world < 1:
        raise OtaroError(f"number of processes must be at least 1 (got {world})")
    if batch_size % world:
        raise OtaroError(f"global batch size {batch_size} is not divisible by {world} processes; "
                         f"use a multiple of {world}")
