"""Write an integer-quantized model as a Hugging Face folder in a registered layout.

Folder: ``model.safetensors`` (each quantized linear in the layout's tensors; embeddings, norms
and head as a normal transformers checkpoint stores them, tied copies once), ``config.json``
with ``quantization_config`` (the layout's keys + ``meta``: ``quantizer`` and ``otaro`` — number
format, method and its config, source, weights sha256), the layout's side files
(``quantize_config.json`` for GPTQ), ``generation_config.json`` and the tokenizer. Every layer is
checked against the layout before anything is written; the folder appears atomically.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch

from otaro import __version__
from otaro.errors import OtaroError
from otaro.hf.layouts import Layout, check_format, get_layout, layout_for_method
from otaro.io import atomic_dir, sha256_file, write_json

WEIGHTS = "model.safetensors"


def _method_record(model, extra: dict | None) -> dict | None:
    if extra and extra.get("method") is not None:
        return extra["method"]
    manifest = getattr(model, "otaro_manifest", None) or {}
    return manifest.get("method")


def resolve_layout(method: str | None, layout: str | Layout | None = None) -> Layout:
    if isinstance(layout, Layout):
        return layout
    return get_layout(layout) if layout else layout_for_method(method)


def check_shapes(shapes: Iterable[tuple[str, int, int]], fmt, layout: Layout) -> None:
    """Every (name, in_features, out_features) fits the layout (raises on the first that does not)."""
    check_format(layout, fmt)
    for name, k, n in shapes:
        layout.check_shape(name, k, n, fmt)


def check_model(model, fmt, method: str | None, layout: str | Layout | None = None) -> Layout:
    """Before quantizing: can this (unquantized) model be saved in the method's layout?"""
    from otaro.arch import quantizable_linears

    lay = resolve_layout(method, layout)
    check_shapes(((n, m.in_features, m.out_features) for n, m in quantizable_linears(model).items()), fmt, lay)
    return lay


def save(model, path: str | Path, tokenizer=None, overwrite: bool = False, extra: dict | None = None,
         layout: str | Layout | None = None) -> Path:
    """Write ``model`` (converted to an int format) as a Hugging Face folder; returns its path.

    The layout is the one of the method recorded in ``extra["method"]`` (or the model's
    manifest), unless ``layout`` names one.
    """
    from safetensors.torch import save_file

    from otaro.checkpoint import quantized_state_dict
    from otaro.hf.codes import layer_codes
    from otaro.modules import IntLinear, quant_layers

    info = getattr(model, "otaro", None)
    if info is None:
        raise OtaroError("only quantized models are saved as Hugging Face quantized folders (convert the model first)")
    method = _method_record(model, extra)
    lay = resolve_layout((method or {}).get("name"), layout)
    layers = quant_layers(model)
    check_shapes(((n, l.in_features, l.out_features) for n, l in layers.items()), info.fmt, lay)
    if not all(isinstance(l, IntLinear) for l in layers.values()):
        raise OtaroError("Hugging Face quantized folders hold IntLinear layers only")

    state = quantized_state_dict(model)
    for name, layer in layers.items():
        for leaf in ("qweight", "scales", "zeros"):
            state.pop(f"{name}.{leaf}")
        for suffix, arr in lay.pack(layer_codes(layer, name)).items():
            state[f"{name}.{suffix}"] = torch.from_numpy(arr)
    state = {k: v.contiguous() for k, v in state.items()}

    qcfg = lay.quantization_config(info.fmt, method or {})
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        qcfg["meta"] = {
            "quantizer": [f"otaro:{__version__}"],
            "otaro": {"format": info.fmt.name, "arch": info.arch, "layout": lay.name, "method": method,
                      "source": (extra or {}).get("source"), "weights_sha256": sha256_file(tmp / WEIGHTS)},
        }
        config = copy.deepcopy(model.config)
        config.quantization_config = qcfg
        if not getattr(config, "architectures", None):  # as transformers' save_pretrained records it
            config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        for fname, content in lay.side_files(qcfg).items():
            write_json(tmp / fname, content)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path
