"""Quantized checkpoints: safetensors + a versioned JSON manifest (``otaro.json``).

Folder layout::

    otaro.json          manifest (format version, number format, arch, layers, checksums, ...)
    model.safetensors   packed quantized buffers + the high-precision tensors
    config.json         the transformers config (no remote code is ever trusted)
    tokenizer files     when a tokenizer was given

The manifest is validated field by field on load; the weights file is checked against its
sha256 and its tensor names and shapes against the model the config builds, so a corrupt,
truncated or foreign folder fails with one clear line. Writes go through ``atomic_dir``.
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from otaro import __version__
from otaro.arch import get_adapter
from otaro.errors import CheckpointError, OtaroError
from otaro.formats import Format, IntFormat, SEFPFormat, get_format
from otaro.formats.table import V1_ROUNDINGS
from otaro.io import atomic_dir, os_errors_of_safetensors, sha256_file, write_json
from otaro.manifest_schema import (CHECKPOINT_SCHEMA, check, check_tokenizer_folder, load_json, tokenizer_file_records,
                                   tokenizer_files_present, verify_tokenizer_files)
from otaro.modules import LINEAR_CLASSES, QuantInfo, SEFPLinear, attach, quant_layers, set_precision

MANIFEST = "otaro.json"
WEIGHTS = "model.safetensors"
CHECKPOINT_VERSION = 3
# Version 1 (before the unbiased derivations) still loads: its codes are the same kind of data;
# only the meaning of the rounding name "nearest" changed (now "halfup" in the table).
# Version 3 adds the quantized head and embedding ("head"; otaro.head); 1 and 2 have float ones.
READABLE_VERSIONS = (1, 2, 3)


def _format_record(fmt: Format) -> dict[str, Any]:
    rec = {k: v for k, v in asdict(fmt).items()}
    rec["name"] = fmt.name
    if "bits" in rec and isinstance(rec["bits"], tuple):
        rec["bits"] = list(rec["bits"])
    return rec


def _tied_names(model) -> dict[str, str]:
    """name -> name of the earlier tensor it shares storage with (tied embeddings)."""
    seen: dict[tuple, str] = {}
    tied = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape, t.dtype, str(t.device))
        if t.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def quantized_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: packed codes for quantized layers (master weights are
    encoded on the way out), everything else as it is; tied duplicates dropped."""
    layers = quant_layers(model)
    tied = _tied_names(model)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        layer_name, _, leaf = name.rpartition(".")
        if layer_name in layers and isinstance(layers[layer_name], SEFPLinear) and leaf == "weight":
            m8, e = layers[layer_name].codes()
            state[f"{layer_name}.mantissa"], state[f"{layer_name}.{layers[layer_name].fmt.shared_name}"] = m8, e
        else:
            state[name] = t
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save(model, path: str | Path, tokenizer=None, overwrite: bool = False, extra: dict | None = None,
         trained_bits=None) -> Path:
    """Write an atomic checkpoint folder for a converted model; returns its path."""
    from safetensors.torch import save_file

    info: QuantInfo | None = getattr(model, "otaro", None)
    if info is None:
        raise OtaroError("only quantized models are saved as otaro checkpoints (convert the model first)")
    layers = quant_layers(model)
    state = quantized_state_dict(model)
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        with os_errors_of_safetensors():
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "otaro": str(CHECKPOINT_VERSION)})
        model.config.save_pretrained(tmp)
        tokenizer_names = []
        if tokenizer is not None:
            tokenizer_names = [Path(p).name for p in tokenizer.save_pretrained(tmp) if Path(p).parent == tmp]
        layer_names = set(layers)
        if info.head is not None:
            layer_names.add(info.head.embedding)
        manifest = {
            "otaro_checkpoint": CHECKPOINT_VERSION,
            "otaro_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "format": _format_record(info.fmt),
            "arch": info.arch,
            "model_type": model.config.model_type,
            "default_bits": getattr(info.fmt, "top_bits", getattr(info.fmt, "bits", None)),
            "trained_bits": list(trained_bits) if trained_bits else None,
            "layers": {
                n: {"in_features": l.in_features, "out_features": l.out_features, "bias": l.bias is not None}
                for n, l in layers.items()
            },
            "high_precision": sorted(k for k in state if k.rpartition(".")[0] not in layer_names),
            "head": info.head.record() if info.head is not None else None,
            "tied": _tied_names(model),
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size},
            # Tokenizer files are read by transformers and copied into exports: checksummed like
            # the weights (an empty record still says "no tokenizer was saved with this model").
            "tokenizer_files": tokenizer_file_records(tmp, tokenizer_names),
            "tools": {"python": platform.python_version(), "torch": torch.__version__, **_lib_versions()},
            **(extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
    return path


def _lib_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {"transformers": transformers.__version__, "safetensors": safetensors.__version__}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and validate ``otaro.json``; every problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    mpath = path / MANIFEST
    if not mpath.is_file() and _hf_reader(path) is not None:
        return _hf_reader(path).read_manifest(path)  # a Hugging Face GPTQ/AWQ folder (otaro.hf)
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not an otaro checkpoint (no {MANIFEST})")
    manifest = load_json(mpath, CheckpointError)
    if not isinstance(manifest, dict) or "otaro_checkpoint" not in manifest:
        raise CheckpointError(f"{mpath} is not an otaro checkpoint manifest")
    version = manifest["otaro_checkpoint"]
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} is checkpoint format version {version!r}; this otaro ({__version__}) reads versions "
            f"{list(READABLE_VERSIONS)}"
        )
    for key, typ in (("format", dict), ("arch", str), ("model_type", str), ("layers", dict), ("weights", dict),
                     ("high_precision", list), ("tied", dict)):
        if not isinstance(manifest.get(key), typ):
            raise CheckpointError(f"{mpath}: field {key!r} is missing or not a {typ.__name__}")
    wfile = manifest["weights"].get("file")
    # The weights file name comes from the artifact: accept a bare file name only, never a path.
    if not isinstance(wfile, str) or Path(wfile).name != wfile or wfile in ("", ".", "..") or not wfile.endswith(".safetensors"):
        raise CheckpointError(f"{mpath}: weights file {wfile!r} must be a plain .safetensors file name")
    # Then every field any reader (load, inspect, export) relies on, with its type.
    return check(manifest, CHECKPOINT_SCHEMA, str(mpath), CheckpointError)


def _upgrade_v1_format(rec: dict[str, Any]) -> dict[str, Any]:
    """A format-v1 record in this table's terms (same stored codes, same decoded values)."""
    if rec.get("family") != "sefp":
        return rec
    rounding = V1_ROUNDINGS.get(rec.get("rounding"))
    if rounding is None:
        raise CheckpointError(f"checkpoint format {rec.get('name')!r} has no format-v1 rounding")
    rec = {k: v for k, v in rec.items() if k != "exponent_bits"}
    rec.update(rounding=rounding, scale="pow2", name=f"sefp-g{rec.get('group_size')}-{rounding}")
    return rec


def format_of(manifest: dict[str, Any]) -> Format:
    rec = manifest["format"]
    if manifest.get("otaro_checkpoint") == 1:
        rec = _upgrade_v1_format(dict(rec))
    try:
        fmt = get_format(rec["name"])
    except (KeyError, OtaroError) as e:
        raise CheckpointError(f"checkpoint number format is unknown: {e}") from None
    expected = _format_record(fmt)
    diff = [k for k in expected if rec.get(k) != expected[k]]
    if diff:
        raise CheckpointError(f"checkpoint format {fmt.name} disagrees with this otaro's table on {diff}")
    return fmt


def _build_skeleton(path: Path, manifest: dict, fmt: Format, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from otaro.arch.multimodal import model_from_config

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any config problem is the artifact's, say so in one line
        raise CheckpointError(f"{path}/config.json cannot be read: {e}") from None
    if config.model_type != manifest["model_type"]:
        raise CheckpointError(f"config.json says {config.model_type!r} but the manifest says {manifest['model_type']!r}")
    # Parameters on the meta device (no random init of a big model); buffers such as rotary
    # tables stay real because they are not in the checkpoint. The class is the one the source
    # loaded as (a causal LM, or a multimodal wrapper such as LLaVA: otaro.arch.multimodal),
    # after checking the architecture is supported.
    with init_empty_weights(include_buffers=False):
        model = model_from_config(config, dtype)
    adapter = get_adapter(model)
    cls = LINEAR_CLASSES[fmt.family]
    names = []
    for name, spec in manifest["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name!r} from the manifest does not exist in a {config.model_type} model") from None
        try:
            mod = cls(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]), fmt, packed=True, dtype=dtype)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"manifest entry for layer {name!r} is malformed") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, mod)
        names.append(name)
    head = None
    if manifest.get("head") is not None:
        from otaro.head import HeadInfo, install_head

        head = HeadInfo.from_record(manifest["head"], CheckpointError)
        if head.layer not in manifest["layers"] or not isinstance(fmt, SEFPFormat):
            raise CheckpointError(f"the manifest's head {head.layer!r} is not one of its SEFP layers")
        try:
            install_head(model, head, fmt, dtype)
        except OtaroError as e:
            raise CheckpointError(str(e)) from None
    attach(model, QuantInfo(fmt, adapter.name, tuple(names), head=head))
    return model


def load(path: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True, bits: int | None = None):
    """Load a checkpoint folder into a transformers model with quantized layers (packed form)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST).is_file() and _hf_reader(path) is not None:
        return _hf_reader(path).load(path, dtype=dtype, verify=verify)
    manifest = read_manifest(path)
    fmt = format_of(manifest)
    wpath = path / manifest["weights"]["file"]
    if not wpath.is_file():
        raise CheckpointError(f"{wpath} is missing")
    if verify and sha256_file(wpath) != manifest["weights"].get("sha256"):
        raise CheckpointError(f"{wpath} is corrupt or truncated (sha256 does not match the manifest)")
    model = _build_skeleton(path, manifest, fmt, dtype)
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath} is not a readable safetensors file: {e}") from None
    expected = {k for k in model.state_dict() if k not in manifest["tied"]}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{wpath} does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    ref = model.state_dict()
    for k, t in state.items():
        if tuple(t.shape) != tuple(ref[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}")
        if ref[k].dtype in (torch.int8, torch.uint8) and t.dtype != ref[k].dtype:
            raise CheckpointError(f"tensor {k} has dtype {t.dtype}, expected {ref[k].dtype}")
        if t.is_floating_point() and t.dtype != dtype:
            state[k] = t.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if model.otaro.head is None:  # a quantized tied head shares its code by construction (otaro.head)
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{wpath} left parameters uninitialised: {leftover[:3]}")
    model.eval()
    if fmt.family == "sefp":
        set_precision(model, bits if bits is not None else manifest.get("default_bits") or fmt.top_bits)
    model.otaro_manifest = manifest
    return model


def load_tokenizer(path: str | Path, manifest: dict | None = None):
    """The tokenizer saved beside a checkpoint, or None if there is none.

    Its files are checked against the manifest's sha256 (checkpoints written before tokenizer
    checksums load unchecked) and may not point outside the folder; a corrupt or unreadable
    tokenizer is one CheckpointError line."""
    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    records = manifest.get("tokenizer_files")
    if records is not None:
        verify_tokenizer_files(path, records, CheckpointError)
    if not tokenizer_files_present(path):
        return None
    return load_tokenizer_folder(path)


def load_tokenizer_folder(path: Path):
    """AutoTokenizer of a local folder (a checkpoint or a Hugging Face model), after checking
    its JSON and that tokenizer_config.json names no file outside ``path``."""
    from transformers import AutoTokenizer

    check_tokenizer_folder(path, CheckpointError)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers' Rust errors and transformers' own: the folder's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"the tokenizer in {path} cannot be read: {first}") from None


def _hf_reader(path: Path):
    """otaro.hf.reader when ``path`` is a Hugging Face folder in a layout it reads (GPTQ, AWQ), else None."""
    from otaro.hf import reader

    return reader if reader.is_hf_quantized(path) else None


def is_checkpoint(path: str | Path) -> bool:
    """An otaro checkpoint folder, or a Hugging Face GPTQ/AWQ folder (read through otaro.hf)."""
    return (Path(path) / MANIFEST).is_file() or _hf_reader(Path(path)) is not None


__all__ = ["save", "load", "load_tokenizer", "read_manifest", "is_checkpoint", "quantized_state_dict",
           "CHECKPOINT_VERSION", "MANIFEST", "WEIGHTS", "SEFPFormat", "IntFormat"]
