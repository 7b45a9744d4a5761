"""Reading the JSON files otaro trusts (manifests, tokenizer files) safely: torch-free.

Everything a manifest says is checked before any of it is used, so a malformed, truncated or
hostile file fails with one clear line (an ``OtaroError`` subclass) instead of a ``KeyError``
deep inside a command:

* :func:`load_json` reads a file as strict UTF-8 JSON, refuses nesting deeper than
  ``MAX_DEPTH`` (a ``'[' * 100000`` file would otherwise raise ``RecursionError``, in the
  parser or later in whatever walks the result) and turns every decoding problem into one line;
* :func:`check` validates a parsed value against a small declarative schema (types, required
  and optional keys, lists and maps of a schema) and names the offending field;
* :func:`check_tokenizer_folder` applies the same rules to tokenizer files, which come with a
  model like any other artifact file: ``tokenizer_config.json`` must not point outside its
  folder (transformers opens whatever its ``tokenizer_file`` / ``vocab_file`` entries name).

Used by ``otaro.checkpoint`` (torch) and ``otaro.runtime`` (no torch): keep this module free of
heavy imports.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any, Iterable

from otaro.errors import OtaroError

# Our manifests nest 5 levels, tokenizer.json about 6; 100 is far above any real file and far
# below Python's recursion limit, so nothing that walks a loaded value can overflow.
MAX_DEPTH = 100


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def load_json(path: str | Path, error: type[OtaroError] = OtaroError, what: str = "") -> Any:
    """The parsed JSON of ``path``; any problem reading or decoding it is one ``error`` line."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{label} is corrupt: not UTF-8 text (bad byte at offset {e.start})") from None
    except RecursionError:
        raise error(f"{label} is corrupt: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and int() of a number with thousands of digits
        raise error(f"{label} is corrupt: not valid JSON ({e})") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise error(f"{label} is corrupt: JSON nested more than {MAX_DEPTH} levels deep")
    return value


# --------------------------------------------------------------------------------------------
# A tiny schema language: a type, a tuple of types, None, a dict {key: schema} (an object with
# those keys; other keys are allowed), Opt(schema) for an optional key, ListOf / MapOf.
# --------------------------------------------------------------------------------------------


class Opt:
    """An optional key (absent is fine; present must match ``schema``)."""

    def __init__(self, schema):
        self.schema = schema


class ListOf:
    def __init__(self, schema):
        self.schema = schema


class MapOf:
    """An object with any string keys, each value matching ``schema``."""

    def __init__(self, schema):
        self.schema = schema


class Check:
    """A predicate with its description, e.g. ``Check(lambda v: v > 0, "a positive integer", int)``."""

    def __init__(self, pred, description: str, base=object):
        self.pred, self.description, self.base = pred, description, base


POS_INT = Check(lambda v: v > 0, "a positive integer", int)
NONNEG_INT = Check(lambda v: v >= 0, "a non-negative integer", int)
NUMBER = (int, float)

_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}


def _type_ok(value, typ) -> bool:
    if typ is None:
        return value is None
    if typ is int or typ is float:  # JSON true/false are not numbers
        return isinstance(value, (int, float) if typ is float else int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _describe(schema) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_describe(s) for s in schema)
    if isinstance(schema, (dict, MapOf)):
        return "an object"
    if isinstance(schema, ListOf):
        return "a list"
    if isinstance(schema, Check):
        return schema.description
    return _NAMES.get(schema if schema is not None else type(None), getattr(schema, "__name__", str(schema)))


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _matches(value, schema) -> bool:
    if isinstance(schema, tuple):
        return any(_matches(value, s) for s in schema)
    if isinstance(schema, dict) or isinstance(schema, MapOf):
        return isinstance(value, dict)
    if isinstance(schema, ListOf):
        return isinstance(value, list)
    if isinstance(schema, Check):
        return _type_ok(value, schema.base) and bool(schema.pred(value))
    return _type_ok(value, schema)


def check(value: Any, schema, where: str, error: type[OtaroError] = OtaroError, path: str = "") -> Any:
    """Validate ``value`` against ``schema``; a mismatch raises ``error`` naming the field."""
    if not _matches(value, schema):
        field = f"field {path!r}" if path else "its top level"
        raise error(f"{where}: {field} must be {_describe(schema)}, not {_kind(value)}")
    if isinstance(schema, tuple):  # descend into the first alternative that matches
        schema = next(s for s in schema if _matches(value, s))
    if isinstance(schema, dict):
        for key, sub in schema.items():
            optional = isinstance(sub, Opt)
            sub = sub.schema if optional else sub
            if key not in value:
                if optional:
                    continue
                raise error(f"{where}: field {_join(path, key)!r} is missing")
            check(value[key], sub, where, error, _join(path, key))
    elif isinstance(schema, MapOf):
        for key, item in value.items():
            check(item, schema.schema, where, error, _join(path, key))
    elif isinstance(schema, ListOf):
        for i, item in enumerate(value):
            check(item, schema.schema, where, error, f"{path}[{i}]")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------------------------
# Checkpoint manifest (otaro.json): what any reader (load, inspect, export) may rely on.
# --------------------------------------------------------------------------------------------

FILE_RECORD = {"sha256": str, "bytes": NONNEG_INT}

CHECKPOINT_SCHEMA = {
    "otaro_checkpoint": int,
    "format": {"name": str},  # the other format fields are compared with the table (checkpoint.format_of)
    "arch": str,
    "model_type": str,
    "layers": MapOf({"in_features": POS_INT, "out_features": POS_INT, "bias": Opt(bool)}),
    "weights": {"file": str, "sha256": str, "bytes": Opt(NONNEG_INT)},
    "high_precision": ListOf(str),
    "tied": MapOf(str),
    "head": Opt((None, {"layer": str, "embedding": str, "tied": bool, "bits": int})),
    "default_bits": Opt((int, None)),
    "trained_bits": Opt((None, ListOf(int))),
    "method": Opt({"name": Opt(str)}),
    "source": Opt({"model": Opt((str, None))}),
    "otaro_version": Opt(str),
    # Since the tokenizer became a checksummed file set; absent in older checkpoints.
    "tokenizer_files": Opt(MapOf(FILE_RECORD)),
}


# --------------------------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------------------------

# Files a tokenizer loader may open by name from a model folder (transformers' AutoTokenizer,
# the runtime's tokenizers/jinja2): they are artifact files like the weights.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)
# tokenizer_config.json keys that transformers never opens (kept for legacy; real configs often
# hold a stale absolute path of the machine that saved them): not refused.
_UNFOLLOWED_FILE_KEYS = {"special_tokens_map_file", "added_tokens_file"}


def tokenizer_files_present(root: str | Path) -> list[str]:
    root = Path(root)
    return [n for n in TOKENIZER_FILES if (root / n).is_file()]


def inside_folder(name: Any) -> bool:
    """Whether ``name`` is a relative path that stays inside its folder (checked on the text:
    a folder's own symlinks are its owner's business, a manifest's ``..`` is not)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    p = PurePath(name)
    return not p.is_absolute() and not p.drive and ".." not in p.parts


def check_tokenizer_folder(root: str | Path, error: type[OtaroError] = OtaroError) -> None:
    """Refuse tokenizer files that are not JSON where JSON is expected, and a
    ``tokenizer_config.json`` whose file entries (``tokenizer_file``, ``vocab_file``,
    ``fast_tokenizer_files``, ...) name a path outside ``root``."""
    root = Path(root)
    for name in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json"):
        if (root / name).is_file():
            load_json(root / name, error, "tokenizer file")
    cfg_path = root / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = check(load_json(cfg_path, error, "tokenizer file"), dict, str(cfg_path), error)
    for key, value in cfg.items():
        if key.endswith("_file") and key not in _UNFOLLOWED_FILE_KEYS and value is not None:
            names: Iterable = [value]
        elif key == "fast_tokenizer_files" and value is not None:
            names = value if isinstance(value, list) else [value]
        else:
            continue
        for name in names:
            if not inside_folder(name):
                raise error(f"{cfg_path}: {key} {name!r} is not a file inside {root} (a tokenizer may only "
                            f"read its own folder)")


def tokenizer_file_records(root: str | Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: {sha256, bytes}} of the tokenizer files ``names`` written in ``root``."""
    from otaro.io import sha256_file

    root = Path(root)
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in sorted(set(names))}


def verify_tokenizer_files(root: str | Path, records: dict[str, dict], error: type[OtaroError] = OtaroError) -> None:
    """Sizes and sha256 of the recorded tokenizer files; a tokenizer file that is present but
    not recorded was not written with the model and is refused too."""
    from otaro.io import sha256_file

    root = Path(root)
    for name, rec in records.items():
        p = root / name
        if not inside_folder(name) or "/" in name:
            raise error(f"tokenizer file name {name!r} in the manifest of {root} must be a plain file name")
        if not p.is_file():
            raise error(f"{p} is missing (the manifest lists it)")
        if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            raise error(f"{p} is corrupt or truncated (size/sha256 differ from the manifest)")
    extra = [n for n in tokenizer_files_present(root) if n not in records]
    if extra:
        raise error(f"{root / extra[0]} is not listed in the manifest (it was not written with the model); "
                    f"remove it or save the model again")
