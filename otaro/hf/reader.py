"""Read a Hugging Face quantized folder (a registered layout: GPTQ, AWQ) into otaro's int modules.

``is_hf_quantized`` recognises the folder from its ``config.json`` alone; ``read_manifest``
describes it in the terms of an otaro checkpoint manifest (format, architecture, layers, method,
source, weights) from the config and the tensor *shapes* only; ``load`` builds the transformers
model on the meta device, unpacks every quantized linear into an ``IntLinear`` (bit-exact codes,
scales and zero points) and loads the float tensors. ``otaro.checkpoint`` dispatches to these, so
``load_source``, ``otaro eval``, ``otaro inspect`` and ``otaro export --variant`` take such folders
wherever they take a checkpoint.

The number format: bits and group size from ``quantization_config``; symmetric only when the
folder is otaro's and says so (``meta.otaro.format``) — a foreign symmetric GPTQ folder may use
code 0 (below otaro's symmetric range), so it is read as the asymmetric format with its zero
points 2^(b-1), which decodes to the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from otaro.errors import CheckpointError
from otaro.formats import IntFormat, get_format
from otaro.hf.layouts import LAYOUTS, Layout, layout_for_config
from otaro.io import sha256_file

CONFIG = "config.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # stale buffers some older checkpoints still carry


def _raw_config(path: Path) -> dict | None:
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def quantization_config(path: str | Path) -> dict | None:
    """The folder's ``quantization_config`` when a registered layout reads its quant_method."""
    path = Path(path)
    if not path.is_dir():
        return None
    cfg = _raw_config(path)
    q = (cfg or {}).get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "")).lower()
    return q if any(l.quant_method == method for l in LAYOUTS.values()) else None


def is_hf_quantized(path: str | Path) -> bool:
    return quantization_config(path) is not None


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights (otaro reads safetensors only, never pickle)")
    return files


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = tuple(h.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return out


def _format(bits: int, group: int, meta: dict, where: str) -> IntFormat:
    name = meta.get("format")
    sym = isinstance(name, str) and name.endswith("-sym")
    try:
        fmt = get_format(f"int{bits}-g{group}-{'sym' if sym else 'asym'}")
    except Exception as e:  # noqa: BLE001 - an unknown row is the folder's problem: one line
        raise CheckpointError(f"{where}: {bits}-bit groups of {group} are not an otaro int format ({e})") from None
    if name is not None and name != fmt.name:
        raise CheckpointError(f"{where}: meta says {name} but quantization_config says {fmt.name}")
    return fmt


def _weights_record(files: list[Path]) -> dict[str, Any]:
    digests = [sha256_file(f) for f in files]
    if len(files) == 1:
        sha = digests[0]
    else:  # a sharded folder: the digest of the shard digests, in file-name order
        import hashlib

        sha = hashlib.sha256("".join(digests).encode()).hexdigest()
    return {"file": files[0].name, "files": [f.name for f in files], "sha256": sha,
            "bytes": sum(f.stat().st_size for f in files)}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """An otaro-style manifest of a Hugging Face quantized folder (no tensor data read)."""
    from transformers import AutoConfig

    from otaro.arch import get_adapter
    from otaro.checkpoint import _format_record

    path = Path(path)
    where = str(path / CONFIG)
    qcfg = quantization_config(path)
    if qcfg is None:
        raise CheckpointError(f"{path} is not a Hugging Face GPTQ/AWQ folder (no readable quantization_config)")
    layout = layout_for_config(qcfg, where)
    bits, group = layout.read_config(qcfg)
    meta_all = qcfg.get("meta") if isinstance(qcfg.get("meta"), dict) else {}
    meta = meta_all.get("otaro") if isinstance(meta_all.get("otaro"), dict) else {}
    fmt = _format(bits, group, meta, where)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where} cannot be read: {str(e).splitlines()[0]}") from None
    adapter = get_adapter(config)
    files = _weight_files(path)
    shapes = _shapes(files)
    names = sorted({k.rpartition(".")[0] for k in shapes if k.endswith(".qweight")})
    layers = {}
    for n in names:
        own = {s: shapes[f"{n}.{s}"] for s in layout.suffixes if f"{n}.{s}" in shapes}
        missing = [s for s in layout.suffixes if s not in own and s not in layout.optional]
        if missing:
            raise CheckpointError(f"{path}: quantized layer {n} has no {', '.join(missing)}")
        k, o = layout.shape_of(own, bits)
        layers[n] = {"in_features": k, "out_features": o, "bias": f"{n}.bias" in shapes}
    if not layers:
        raise CheckpointError(f"{path}: quantization_config says {layout.quant_method} but no tensor is a qweight")
    if meta:
        method = meta.get("method")
    else:  # a foreign folder: its producer's word, which is all there is
        method = {"name": layout.quant_method, "config": {k: v for k, v in qcfg.items() if k != "meta"},
                  "producer": meta_all.get("quantizer")}
    return {
        "otaro_checkpoint": f"hf-{layout.name}",
        "otaro_version": next((q.split(":", 1)[1] for q in meta_all.get("quantizer") or []
                               if isinstance(q, str) and q.startswith("otaro:")), None),
        "format": _format_record(fmt),
        "arch": adapter.name,
        "model_type": config.model_type,
        "default_bits": fmt.bits,
        "trained_bits": None,
        "layers": layers,
        "high_precision": sorted(k for k in shapes if k.rpartition(".")[0] not in layers),
        "tied": {},
        "weights": _weights_record(files),
        "method": method,
        "source": meta.get("source"),
        "hf": {"layout": layout.name, "quantization_config": qcfg, "recorded_sha256": meta.get("weights_sha256")},
    }


def load(path: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True):
    """The folder as a transformers model with otaro ``IntLinear`` layers (like ``checkpoint.load``)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from otaro.arch import get_adapter, quantizable_linears
    from otaro.checkpoint import _tied_names
    from otaro.hf.codes import int_linear
    from otaro.modules import QuantInfo, attach

    path = Path(path)
    manifest = read_manifest(path)
    recorded = manifest["hf"]["recorded_sha256"]
    if verify and recorded and recorded != manifest["weights"]["sha256"]:
        raise CheckpointError(f"{path}/{manifest['weights']['file']} is corrupt or truncated "
                              "(sha256 does not match quantization_config.meta)")
    layout: Layout = LAYOUTS[manifest["hf"]["layout"]]
    qcfg = manifest["hf"]["quantization_config"]
    fmt = get_format(manifest["format"]["name"])
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the layers become otaro's; transformers must not quantize
    adapter = get_adapter(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    expected = quantizable_linears(model, adapter)
    have = manifest["layers"]
    if set(have) != set(expected):
        miss, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
        raise CheckpointError(f"{path}: quantized layers do not match otaro's {adapter.name} linears (float: "
                              f"{miss[:3]}{'...' if len(miss) > 3 else ''}; unexpected: {extra[:3]})")
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        state.update(load_file(str(f)))
    for name, linear in expected.items():
        if (have[name]["in_features"], have[name]["out_features"]) != (linear.in_features, linear.out_features):
            raise CheckpointError(f"{path}: {name} is [{have[name]['out_features']}, {have[name]['in_features']}], "
                                  f"the config builds [{linear.out_features}, {linear.in_features}]")
        tensors = {s: state.pop(f"{name}.{s}").numpy() for s in layout.suffixes if f"{name}.{s}" in state}
        bias = state.pop(f"{name}.bias", None)
        if (bias is not None) != (linear.bias is not None):
            raise CheckpointError(f"{path}: {name} {'has' if bias is not None else 'lacks'} a bias the config "
                                  f"{'does not build' if bias is not None else 'builds'}")
        codes = layout.unpack(tensors, qcfg, fmt.bits, fmt.group_size)
        mod = int_linear(codes, fmt, bias, dtype, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, mod)
    ref = model.state_dict()
    unexpected = sorted(k for k in state if k not in ref and not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model does not have: {unexpected[:3]}")
    rest = {}
    for k, t in state.items():
        if k not in ref:
            continue
        if tuple(t.shape) != tuple(ref[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}")
        rest[k] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{path} left parameters uninitialised: {leftover[:3]}")
    model.eval()
    attach(model, QuantInfo(fmt, adapter.name, tuple(expected)))
    manifest["tied"] = _tied_names(model)
    model.otaro_manifest = manifest
    return model


__all__ = ["is_hf_quantized", "quantization_config", "read_manifest", "load"]
