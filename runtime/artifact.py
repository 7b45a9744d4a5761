"""The exported artifact's manifest: schema, validation and paths (torch-free).

Folder layout (written by :mod:`otaro.export`)::

    otaro_artifact.json       this manifest
    model.onnx                the single SEFP model (ai.otaro.SefpMatMul_* functions)
    model.onnx_data           its weights (int8 mantissas, per-group scales, float rest)
    config.json, generation_config.json, tokenizer files, genai_config.json
    variants/<name>/          fixed-precision MatMulNBits models, each a runnable folder

Everything read from an artifact is checked here before use: types of every field, file names
that must be bare names (or ``variants/<name>``), sha256 of files on request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from otaro.errors import FormatError, OtaroError
from otaro.formats.table import V1_ROUNDINGS, SEFPFormat
from otaro.manifest_schema import NONNEG_INT, POS_INT, ListOf, MapOf, Opt, check, load_json

MANIFEST = "otaro_artifact.json"
FORMAT_VERSION = 3
# v1 artifacts (before the unbiased derivations) still load: their rounding names are remapped.
# v3 adds the quantized head ("head": the layer with a precision of its own) and embedding
# (an ai.otaro.SefpGather node); v1/v2 have float ones and load unchanged.
READABLE_VERSIONS = (1, 2, 3)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(OtaroError):
    """A missing, foreign or corrupt artifact."""


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ArtifactError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def _require(m: dict, key: str, typ, where: str = "manifest"):
    if key not in m:
        raise ArtifactError(f"{where} has no {key!r} field")
    if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
        raise ArtifactError(f"{where} field {key!r} has type {type(m[key]).__name__}")
    return m[key]


def _check_files(files: Any, where: str) -> dict[str, dict]:
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{where} lists no files")
    for name, rec in files.items():
        check_name(name, f"file name in {where}")
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("bytes"), int):
            raise ArtifactError(f"{where} entry for {name} needs sha256 and bytes")
    return files


def validate(m: Any) -> dict:
    if not isinstance(m, dict):
        raise ArtifactError("manifest is not a JSON object")
    version = m.get("otaro_artifact")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"artifact format version {version!r} is not supported by this otaro "
                            f"(it reads versions {list(READABLE_VERSIONS)}); re-export the model with this otaro")
    _require(m, "format", str)
    model = _require(m, "model", dict)
    for k in ("file", "data"):
        check_name(_require(model, k, str, "manifest model"), "model file name")
    _check_files(_require(model, "files", dict, "manifest model"), "model")
    sefp = _require(m, "sefp", dict)
    for k in ("format", "function", "domain", "bits_input", "rounding"):
        _require(sefp, k, str, "manifest sefp")
    _require(sefp, "group_size", int, "manifest sefp")
    if version == 1:
        # Format v1's "nearest" rounded half up; the table keeps that derivation as "halfup".
        rounding = sefp["rounding"]
        if rounding not in V1_ROUNDINGS:
            raise ArtifactError(f"manifest sefp rounding {rounding!r} is not a format-v1 rounding")
        sefp["rounding"], sefp["scale"] = V1_ROUNDINGS[rounding], "pow2"
    try:
        SEFPFormat(group_size=sefp["group_size"], rounding=sefp["rounding"], scale=sefp.get("scale", "pow2"))
    except FormatError as e:
        raise ArtifactError(f"manifest sefp format is not in this otaro's table: {e}") from None
    bits = _require(m, "bits", list)
    if not bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in bits):
        raise ArtifactError(f"manifest bits {bits!r} must be integers 2-8")
    if _require(m, "default_bits", int) not in bits:
        raise ArtifactError("manifest default_bits is not one of its bits")
    _require(m, "accuracy_level", int)
    layers = _require(m, "layers", dict)
    for name, rec in layers.items():
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), int) for k in ("in_features", "out_features")):
            raise ArtifactError(f"manifest layer {name!r} needs in_features and out_features")
    head = m.get("head")
    if head is not None:
        if not isinstance(head, dict) or head.get("layer") not in layers or not isinstance(head.get("bits"), int) \
                or head["bits"] not in bits:
            raise ArtifactError(f"manifest head {head!r} must name one of its layers and bits among {bits}")
    _check_files(_require(m, "files", dict), "manifest")
    for v in _require(m, "variants", list):
        if not isinstance(v, dict):
            raise ArtifactError("a manifest variant is not an object")
        check_name(_require(v, "name", str, "variant"), "variant name")
        if v.get("path") != f"variants/{v['name']}":
            raise ArtifactError(f"variant {v['name']} has path {v.get('path')!r}, expected variants/{v['name']}")
        _require(v, "kind", str, "variant")
        _require(v, "format", str, "variant")
        _check_files(_require(v, "files", dict, "variant"), f"variant {v['name']}")
    # Then the rest of what readers (the runtime, `otaro inspect`) use, with its type.
    return check(m, ARTIFACT_SCHEMA, "manifest", ArtifactError)


FILES = MapOf({"sha256": str, "bytes": NONNEG_INT})
ARTIFACT_SCHEMA = {
    "model": {"files": FILES},
    "sefp": {"scale": Opt(str), "top_bits": Opt(int), "exponent_bits": Opt((int, None))},
    "architecture": {"arch": str, "model_type": str, "num_hidden_layers": Opt((int, None)),
                     "vocab_size": Opt((int, None))},
    "layers": MapOf({"in_features": POS_INT, "out_features": POS_INT}),
    "files": FILES,
    "trained_bits": Opt((None, ListOf(int))),
    "variants": ListOf({"path": str, "bits": int, "container_bits": (int, None), "accuracy_level": int,
                        "files": FILES}),
    "head": Opt((None, {"layer": str, "embedding": str, "tied": bool, "bits": int})),
    "tools": Opt(MapOf((str, None))),
    "created": Opt(str),
    "source": Opt(dict),
}


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder (an artifact is the folder `otaro export` wrote)")
    if not f.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not an otaro artifact (or an interrupted export)")
    return validate(load_json(f, ArtifactError))


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def verify_files(root: Path, files: dict[str, dict]) -> None:
    """sha256 and size of every listed file under ``root``."""
    from otaro.io import sha256_file

    for name, rec in files.items():
        p = root / name
        if not p.is_file():
            raise ArtifactError(f"{p} is missing")
        if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            raise ArtifactError(f"{p} is corrupt or truncated (size/sha256 differ from the manifest)")


def variant(m: dict, name: str) -> dict:
    for v in m["variants"]:
        if v["name"] == name:
            return v
    names = ", ".join(v["name"] for v in m["variants"]) or "none"
    raise FormatError(f"the artifact has no variant {name!r} (it has: {names})")
