"""Trace the float decoder (with KV cache) to ONNX and find each quantized linear's MatMul.

We let optimum-onnx do the tracing (KV-cache I/O, dynamic axes, the layout
``ORTModelForCausalLM`` and onnxruntime-genai expect) on a *float* copy of the quantized model,
then rewrite the graph (:mod:`otaro.export.rewrite`): that keeps our formats out of the torch
exporter, as onnxruntime's own quantizers do (DESIGN.md §7.9).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from otaro.errors import OtaroError
from otaro.modules import quant_layers

TASK = "text-generation-with-past"


class _FloatEmbedding(nn.Embedding):
    """nn.Embedding, times ``embed_scale`` when the original had one (Gemma 3's scaled embedding)."""

    embed_scale = None

    def forward(self, ids):
        rows = super().forward(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)


def float_copy(model: nn.Module) -> nn.Module:
    """The model with every quantized layer replaced by an ``nn.Linear`` holding its decoded
    weight at the current precision (the values do not matter: the rewrite replaces them, but
    :func:`locate_linears` uses them to check it found the right MatMul)."""
    layers = quant_layers(model)
    fmodel = copy.deepcopy(model)
    for name, layer in layers.items():
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(layer.quantized_weight().float())
            if layer.bias is not None:
                lin.bias.copy_(layer.bias.float())
        parent, _, leaf = name.rpartition(".")
        setattr(fmodel.get_submodule(parent) if parent else fmodel, leaf, lin)
    head = model.otaro.head
    if head is not None:  # the quantized embedding, as the float table it decodes to
        emb = model.get_submodule(head.embedding)
        femb = _FloatEmbedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        with torch.no_grad():
            femb.weight.copy_(emb.dequantized().float())
        femb.embed_scale = None if emb.embed_scale is None else emb.embed_scale.detach().clone()
        parent, _, leaf = head.embedding.rpartition(".")
        setattr(fmodel.get_submodule(parent) if parent else fmodel, leaf, femb)
    for attr in ("otaro", "otaro_manifest"):
        if hasattr(fmodel, attr):
            delattr(fmodel, attr)
    return fmodel.float().eval()


@contextlib.contextmanager
def _quiet():
    """optimum and the TorchScript exporter print pages of tracer warnings for every model."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def trace_decoder(fmodel: nn.Module, out_dir: Path) -> Path:
    """Export ``fmodel`` with optimum into ``out_dir``; returns the model.onnx path."""
    from optimum.exporters.onnx import onnx_export_from_model

    from otaro.arch.rope import traceable_rope

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # traceable_rope: rope types that pick their frequencies with a Python `if` (LongRoPE)
        # would otherwise be frozen at the dummy input's length (otaro/arch/rope.py).
        with _quiet(), torch.no_grad(), traceable_rope(fmodel):
            onnx_export_from_model(fmodel, str(out_dir), task=TASK, do_validation=False)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise OtaroError(f"optimum could not export this {fmodel.config.model_type} model: {e}") from None
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise OtaroError(f"optimum wrote no model.onnx into {out_dir}")
    return path


def scope_of(module_name: str) -> str:
    """TorchScript node scope of a module path: ``model.layers.0.mlp.up_proj`` ->
    ``/model/layers.0/mlp/up_proj`` (a numeric child stays glued to its container)."""
    parts: list[str] = []
    for p in module_name.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/" + "/".join(parts)


def locate_embedding(proto: onnx.ModelProto, fmodel: nn.Module, name: str) -> tuple[int, str]:
    """(index of the embedding's Gather node, name of its table initializer), checked by value
    as :func:`locate_linears` does."""
    inits = {i.name: i for i in proto.graph.initializer}
    scope = scope_of(name) + "/"
    ref = fmodel.get_submodule(name).weight.detach().numpy()
    for k, node in enumerate(proto.graph.node):
        if node.op_type != "Gather" or not node.name.startswith(scope) or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.shape == ref.shape and np.array_equal(w, ref):
            return k, node.input[0]
    raise OtaroError(f"could not find the Gather of embedding {name} in the exported graph (expected a node "
                     f"under {scope} reading its table)")


def locate_linears(proto: onnx.ModelProto, fmodel: nn.Module, names: list[str]) -> dict[str, tuple[int, str]]:
    """{layer name: (index of its MatMul node, name of its weight initializer)}.

    Found by the node's scope name, then *checked by value*: the initializer must equal the
    transposed weight bit for bit, so a renamed scope can never make us quantize the wrong
    tensor."""
    inits = {i.name: i for i in proto.graph.initializer}
    by_name = {n.name: (k, n) for k, n in enumerate(proto.graph.node) if n.op_type == "MatMul"}
    found: dict[str, tuple[int, str]] = {}
    for name in names:
        hit = by_name.get(scope_of(name) + "/MatMul")
        if hit is None or hit[1].input[1] not in inits:
            raise OtaroError(f"could not find the MatMul of layer {name} in the exported graph (expected node "
                             f"{scope_of(name)}/MatMul with a constant weight)")
        k, node = hit
        w = numpy_helper.to_array(inits[node.input[1]])
        ref = fmodel.get_submodule(name).weight.detach().numpy().T
        if w.shape != ref.shape or not np.array_equal(w, ref):
            raise OtaroError(f"the exported weight of {name} does not match the model (node {node.name})")
        found[name] = (k, node.input[1])
    return found
