"""The fused decoder graph: onnxruntime-genai's model builder, normalised to our layer names.

``--graph fused`` builds the float decoder with the builder (GroupQueryAttention with rotary,
SkipSimplifiedLayerNormalization: ~11 nodes per block instead of ~100 in the optimum trace) and
then reshapes it into the contract the rest of the exporter works with, so
:func:`otaro.export.trace.locate_linears`, the SEFP rewrite and the runtime do not know which
graph they were given:

* the builder packs q, k and v into one ``qkv_proj`` MatMul; it is split back into three
  MatMuls (named ``/model/layers.N/self_attn/{q,k,v}_proj/MatMul``, as the trace names them)
  and a Concat, because each of our linears carries its own code and may carry its own
  precision;
* ``attn/o_proj`` is renamed ``self_attn/o_proj`` the same way;
* the model is saved untied (its own embedding table), so the embedding is a plain
  ``Gather(table, input_ids)``; the usual tied-head sharing re-ties it after the rewrite.

GroupQueryAttention reads each row's length from the attention mask (``seqlens_k``) and
assumes the real tokens come first: a batch of such a graph is right-padded
(``otaro.padding = right`` in the metadata, ``PADDING_KEY``; :class:`otaro.runtime.decoder.Batch`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
from onnx import helper, numpy_helper
from torch import nn

from otaro.errors import OtaroError
from otaro.export import genai_builder
from otaro.formats import onnx_ops as ops

# transformers model_type -> builder architecture we have validated end to end (tests on a tiny
# random model, benchmarks on SmolLM2). Others export through the optimum trace.
FUSED_TYPES = ("llama",)
_QKV = re.compile(r"^/model/layers\.(\d+)/attn/qkv_proj/MatMul$")
_O = re.compile(r"^/model/layers\.(\d+)/attn/o_proj/MatMul$")


def supported(model_type: str) -> bool:
    return model_type in FUSED_TYPES


def check_supported(model_type: str) -> None:
    if not supported(model_type):
        raise OtaroError(f"--graph fused supports {', '.join(FUSED_TYPES)} models (this is {model_type}); "
                         f"use --graph traced (or auto)")
    need = genai_builder.available()
    if need:
        raise OtaroError(need)


def _save_source(fmodel: nn.Module, tokenizer, where: Path) -> Path:
    """The float model as a Hugging Face folder the builder reads: untied, safetensors."""
    src = where / "hf"
    cfg = fmodel.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    cfg.tie_word_embeddings = False  # its own embedding table: a plain Gather (module docstring)
    head, emb = fmodel.get_output_embeddings(), fmodel.get_input_embeddings()
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        # safetensors stores a shared tensor once and the untied config would then load a
        # random head: give the (throw-away) float copy a head of its own.
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    try:
        fmodel.save_pretrained(str(src), safe_serialization=True)
    finally:
        cfg.tie_word_embeddings = tied
    if tokenizer is not None:
        tokenizer.save_pretrained(str(src))
    return src


def _split_qkv(proto: onnx.ModelProto, sizes: dict[int, tuple[int, int, int]]) -> None:
    """Every ``attn/qkv_proj`` MatMul -> three MatMuls + Concat on the last axis."""
    inits = {t.name: k for k, t in enumerate(proto.graph.initializer)}
    out_nodes = []
    drop = set()
    new_inits = []
    for node in proto.graph.node:
        m = _QKV.match(node.name)
        if node.op_type != "MatMul" or m is None:
            o = _O.match(node.name)
            if node.op_type == "MatMul" and o is not None:
                node.name = f"/model/layers.{o[1]}/self_attn/o_proj/MatMul"
            out_nodes.append(node)
            continue
        layer = int(m[1])
        w_name = node.input[1]
        if w_name not in inits or layer not in sizes:
            raise OtaroError(f"the builder's {node.name} has no constant weight to split")
        w = numpy_helper.to_array(proto.graph.initializer[inits[w_name]])
        nq, nk, nv = sizes[layer]
        if w.ndim != 2 or w.shape[1] != nq + nk + nv:
            raise OtaroError(f"the builder's {node.name} weight is {list(w.shape)}, expected [K, {nq + nk + nv}]")
        parts = []
        for proj, lo, hi in (("q", 0, nq), ("k", nq, nq + nk), ("v", nq + nk, nq + nk + nv)):
            scope = f"/model/layers.{layer}/self_attn/{proj}_proj"
            name = f"model.layers.{layer}.self_attn.{proj}_proj.MatMul.weight"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w[:, lo:hi]), name))
            out = f"{scope}/MatMul/output_0"
            out_nodes.append(helper.make_node("MatMul", [node.input[0], name], [out], name=f"{scope}/MatMul"))
            parts.append(out)
        out_nodes.append(helper.make_node("Concat", parts, [node.output[0]], axis=-1,
                                          name=f"/model/layers.{layer}/self_attn/qkv/Concat"))
        drop.add(w_name)
    proto.graph.ClearField("node")
    proto.graph.node.extend(out_nodes)
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(keep + new_inits)


def _fix_kv_dims(proto: onnx.ModelProto, head_dim: int) -> None:
    """The builder names the head size of the KV tensors ``kv_cache_dim``; the graph contract
    (otaro.runtime.decoder.DecoderIO) and genai_config.json read it as a number."""
    for vi in list(proto.graph.input) + list(proto.graph.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].dim_value:
                dims[3].ClearField("dim_param")
                dims[3].dim_value = head_dim


def _standard_rmsnorm(proto: onnx.ModelProto) -> None:
    """onnxruntime's ``SimplifiedLayerNormalization`` sits in the default domain, where the ONNX
    checker (and every runtime but onnxruntime) has no such op; the builder emits it once, for the
    first block's input norm. Written out in standard ops: x · 1/sqrt(mean(x²) + ε) · γ."""
    out = []
    for node in proto.graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            out.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or len(node.input) != 2:
            raise OtaroError(f"the builder's {node.name} normalises axis {attrs.get('axis')}; use --graph traced")
        x, gamma = node.input
        p = node.name
        eps = f"{p}/epsilon"
        axes = f"{p}/axes"
        proto.graph.initializer.extend([numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), eps),
                                        numpy_helper.from_array(np.array([-1], np.int64), axes)])
        steps = [("Mul", [x, x]), ("ReduceMean", None), ("Add", None), ("Sqrt", None), ("Reciprocal", None),
                 ("Mul", None), ("Mul", None)]
        prev = None
        for i, (op, ins) in enumerate(steps):
            ins = ins or {"ReduceMean": [prev, axes], "Add": [prev, eps], "Mul": [x, prev] if i == 5 else [prev, gamma]
                          }.get(op, [prev])
            o = node.output[0] if i == len(steps) - 1 else f"{p}/{op}_{i}/output_0"
            kw = {"keepdims": 1} if op == "ReduceMean" else {}
            out.append(helper.make_node(op, ins, [o], name=f"{p}/{op}_{i}", **kw))
            prev = o
    proto.graph.ClearField("node")
    proto.graph.node.extend(out)


def _lower_opset(proto: onnx.ModelProto, target: int) -> None:
    """Declare opset ``target`` (the SEFP functions' opset) instead of the builder's newer one,
    which is exact only if no op of the graph changed between the two; checked op by op."""
    imp = next((o for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if imp is None or imp.version <= target:
        return
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            since = onnx.defs.get_schema(node.op_type, imp.version).since_version
        except onnx.defs.SchemaError:
            continue  # onnxruntime's own ops in the default domain (SimplifiedLayerNormalization)
        if since > target:
            raise OtaroError(f"the builder's graph uses {node.op_type} from opset {since}, newer than the "
                             f"opset {target} of our SEFP functions; use --graph traced")
    imp.version = target


def _qkv_sizes(fmodel: nn.Module) -> dict[int, tuple[int, int, int]]:
    sizes = {}
    for i, layer in enumerate(fmodel.model.layers):
        a = layer.self_attn
        if any(getattr(getattr(a, p), "bias", None) is not None for p in ("q_proj", "k_proj", "v_proj")):
            raise OtaroError("--graph fused does not handle attention biases yet; use --graph traced")
        sizes[i] = (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features)
    return sizes


def build_decoder(fmodel: nn.Module, tokenizer, out_dir: Path) -> Path:
    """The fused float decoder of ``fmodel`` in ``out_dir``, normalised (module docstring);
    returns the model.onnx path. The exporter writes the side files (tokenizer, genai config)
    itself, as for a traced graph."""
    check_supported(fmodel.config.model_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".builder"
    work.mkdir(exist_ok=True)
    try:
        src = _save_source(fmodel, tokenizer, work)
        built = genai_builder.build_float(src, work / "out", work / "cache")
        proto = onnx.load(str(built))
        _split_qkv(proto, _qkv_sizes(fmodel))
        _standard_rmsnorm(proto)
        _lower_opset(proto, ops.OPSET)
        attn = fmodel.model.layers[0].self_attn
        _fix_kv_dims(proto, int(getattr(attn, "head_dim", 0) or attn.k_proj.out_features // attn.config.num_key_value_heads))
        if (work / "hf" / "generation_config.json").is_file():
            shutil.copyfile(work / "hf" / "generation_config.json", out_dir / "generation_config.json")
        shutil.copyfile(work / "hf" / "config.json", out_dir / "config.json")
        path = out_dir / "model.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
