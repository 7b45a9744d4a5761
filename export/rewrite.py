"""Graph rewrites from the traced float decoder to the quantized forms (onnx + numpy only).

Each quantized linear's ``MatMul(X, W^T)`` becomes either the SEFP function call (the single
model) or a ``MatMulNBits`` (fixed-precision variants); its float initializer is dropped. The
tied LM head, which the tracer stores as a second transposed copy of the embedding, becomes a
``Transpose`` of the embedding (folded by onnxruntime at load, so it costs no speed and halves
the bytes of a tied model's float part on disk).
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from otaro.errors import OtaroError
from otaro.formats import onnx_ops as ops
from otaro.formats.sefp import SEFPTensor
from otaro.formats.table import SEFPFormat
from otaro.io import _umask

DATA_SUFFIX = "_data"  # optimum's name for the external data file: model.onnx_data
HEAD_BITS, EMBED_BITS = ops.HEAD_BITS_INPUT, ops.EMBED_BITS_INPUT


@dataclass(frozen=True)
class NBitsWeight:
    """One linear in MatMulNBits layout."""

    B: np.ndarray  # uint8 [N, blocks, block*bits/8]
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray | None  # uint8 packed, or None (zero point 2^(bits-1))
    K: int
    N: int
    bits: int  # container
    block_size: int


def _replace_initializers(proto: onnx.ModelProto, drop: set[str], add: list[onnx.TensorProto]) -> None:
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(keep + add)


def _still_used(proto: onnx.ModelProto, names: set[str]) -> set[str]:
    used = {i for n in proto.graph.node for i in n.input}
    return names & used


def rewrite_sefp(proto: onnx.ModelProto, located: dict[str, tuple[int, str]], tensors: dict[str, SEFPTensor],
                 fmt: SEFPFormat, default_bits: int, head: tuple[str, int] | None = None) -> None:
    """Every located MatMul -> ``ai.otaro.SefpMatMul_*``; adds the ``sefp_bits`` initializer
    (a plain initializer, *not* a graph input: constant, so runtimes fold the decode). A
    quantized head (``(name, bits)``) reads its own constant, ``sefp_head_bits``: editing
    ``sefp_bits`` switches the decoder layers only, as everywhere else (otaro.head)."""
    fmt.check_bits(default_bits)
    add, drop = [], set()
    for name, (k, w_name) in located.items():
        node = proto.graph.node[k]
        mant, scale8 = ops.sefp_initializers(tensors[name])
        add += [numpy_helper.from_array(mant, f"{name}.mantissa"), numpy_helper.from_array(scale8, f"{name}.scale8")]
        bits = HEAD_BITS if head is not None and name == head[0] else ops.BITS_INPUT
        new = ops.sefp_node(fmt, node.input[0], f"{name}.mantissa", f"{name}.scale8", node.output[0],
                            name=node.name.removesuffix("MatMul") + ops.SEFP_OP, bits=bits)
        proto.graph.node[k].CopyFrom(new)
        drop.add(w_name)
    add.append(numpy_helper.from_array(np.array(default_bits, np.int64), ops.BITS_INPUT))
    if head is not None:
        fmt.check_bits(head[1])
        add.append(numpy_helper.from_array(np.array(head[1], np.int64), HEAD_BITS))
    _replace_initializers(proto, drop - _still_used(proto, drop), add)
    proto.functions.append(ops.sefp_function(fmt))


def rewrite_matmulnbits(proto: onnx.ModelProto, located: dict[str, tuple[int, str]],
                        weights: dict[str, NBitsWeight], accuracy_level: int) -> None:
    add, drop = [], set()
    for name, (k, w_name) in located.items():
        node, w = proto.graph.node[k], weights[name]
        add += [numpy_helper.from_array(w.B, f"{name}.qweight"), numpy_helper.from_array(w.scales, f"{name}.scales")]
        zp = None
        if w.zero_points is not None:
            zp = f"{name}.qzeros"
            add.append(numpy_helper.from_array(w.zero_points, zp))
        new = ops.matmulnbits_node(node.input[0], f"{name}.qweight", f"{name}.scales", node.output[0],
                                   name=node.name.removesuffix("MatMul") + "MatMulNBits", K=w.K, N=w.N,
                                   bits=w.bits, block_size=w.block_size, accuracy_level=accuracy_level,
                                   zero_points=zp)
        proto.graph.node[k].CopyFrom(new)
        drop.add(w_name)
    _replace_initializers(proto, drop - _still_used(proto, drop), add)


def rewrite_embedding(proto: onnx.ModelProto, located: tuple[int, str], codes: str, tensor: SEFPTensor,
                      fmt: SEFPFormat) -> None:
    """The embedding's ``Gather(table, ids)`` -> ``ai.otaro.SefpGather`` on the SEFP code named
    ``codes`` (``codes.mantissa`` / ``codes.scale8``): the head's when tied (already in the graph,
    so stored once), else the embedding's own, added from ``tensor``. Decoded at the top bits."""
    k, w_name = located
    node = proto.graph.node[k]
    have = {t.name for t in proto.graph.initializer}
    add = []
    if f"{codes}.mantissa" not in have:
        mant, scale8 = ops.sefp_initializers(tensor)
        add += [numpy_helper.from_array(mant, f"{codes}.mantissa"), numpy_helper.from_array(scale8, f"{codes}.scale8")]
    if EMBED_BITS not in have:
        add.append(numpy_helper.from_array(np.array(fmt.top_bits, np.int64), EMBED_BITS))
    new = ops.sefp_gather_node(fmt, node.input[1], f"{codes}.mantissa", f"{codes}.scale8", node.output[0],
                               name=node.name.removesuffix("Gather") + ops.GATHER_OP, bits=EMBED_BITS)
    proto.graph.node[k].CopyFrom(new)
    _replace_initializers(proto, {w_name} - _still_used(proto, {w_name}), add)
    if not any(f.name == ops.gather_function_name(fmt) for f in proto.functions):
        proto.functions.append(ops.sefp_gather_function(fmt))


def share_tied_head(proto: onnx.ModelProto) -> str | None:
    """If a MatMul's constant weight is exactly the transpose of a Gather'ed embedding, feed it
    a Transpose of the embedding instead. Returns the embedding's name, or None."""
    inits = {t.name: t for t in proto.graph.initializer}
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        b = inits[node.input[1]]
        if len(b.dims) != 2:
            continue
        for e_name in gathered:
            e = inits[e_name]
            if list(e.dims) != list(reversed(b.dims)) or e.data_type != b.data_type:
                continue
            if np.array_equal(numpy_helper.to_array(e).T, numpy_helper.to_array(b)):
                t_name = f"{e_name}.transposed"
                old = node.input[1]
                node.input[1] = t_name
                proto.graph.node.insert(0, helper.make_node("Transpose", [e_name], [t_name], perm=[1, 0],
                                                           name="/otaro/tied_head/Transpose"))
                _replace_initializers(proto, {old} - _still_used(proto, {old}), [])
                return e_name
    return None


def finalize(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Opset 21 (blocked DQ), IR 10, our domains, metadata props."""
    domains = {o.domain: o for o in proto.opset_import}
    default = domains.get("") or domains.get("ai.onnx")
    if default is None or default.version > ops.OPSET:
        raise OtaroError(f"the traced graph has opset {default.version if default else '?'}, expected <= {ops.OPSET}")
    # optimum traces at opset 18; the ops it emits did not change meaning up to 21 (only type
    # lists grew), and validation against torch checks the result end to end.
    default.version = ops.OPSET
    for dom, ver in ((ops.DOMAIN, ops.DOMAIN_VERSION), (ops.MS_DOMAIN, 1)):
        if dom not in domains:
            proto.opset_import.append(helper.make_opsetid(dom, ver))
    proto.ir_version = ops.IR_VERSION
    proto.producer_name = "otaro"
    del proto.metadata_props[:]
    for k, v in sorted(metadata.items()):
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))


def save(proto: onnx.ModelProto, path: Path) -> list[Path]:
    """model.onnx + one external data file beside it (every tensor above 1 KiB)."""
    data = path.with_name(path.name + DATA_SUFFIX)
    for p in (path, data):
        if p.exists():
            p.unlink()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if data.exists():
        os.chmod(data, 0o666 & ~_umask())  # onnx creates it 0600; outputs get normal permissions
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise OtaroError(f"the rewritten model does not pass the ONNX checker: {e}") from None
    return [path, data]


def bits_initializer(proto: onnx.ModelProto) -> onnx.TensorProto:
    for t in proto.graph.initializer:
        if t.name == ops.BITS_INPUT:
            return t
    raise OtaroError(f"the model has no {ops.BITS_INPUT!r} initializer: not a single SEFP model")


def set_default_bits(proto: onnx.ModelProto, bits: int) -> None:
    """Edit the constant bits (what a session-level switch does before creating a session)."""
    t = bits_initializer(proto)
    t.CopyFrom(numpy_helper.from_array(np.array(bits, np.int64), ops.BITS_INPUT))
