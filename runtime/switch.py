"""Precision switching: derive the b-bit codes from the stored 8-bit mantissas, pack them into
``MatMulNBits`` layout, build that precision's model in memory, keep warm sessions in a cache.

The artifact is read from disk once (:class:`Master`): the graph without weights, the raw bytes
of ``model.onnx_data``, and each layer's int8 mantissas ``[K, N]`` / ``scale8 [groups, N]`` as
views into those bytes. A precision's model is the same graph where every ``ai.otaro.SefpMatMul``
node becomes a ``com.microsoft.MatMulNBits`` in the container for its bits. Its packed
weights reach onnxruntime through a file in the runtime's spill folder (:mod:`otaro.runtime.spill`):
each layer is packed, written to its rows and freed, and onnxruntime maps the file and reads
each weight once while it prepacks. Without a spill folder every tensor is *external data held
in memory* (``add_external_initializers_from_files_in_memory``), which onnxruntime copies into
the session before it prepacks. Either way nothing is re-read from the artifact and nothing is
copied into protobuf, so models above protobuf's 2 GB limit build like small ones. The float
weights (embeddings, untied head) are the same at every precision: sessions borrow them from
the master (``add_initializer``) instead of copying them.

A layer whose code has no container on the backend (``midpoint`` at 8 bits: a 9-bit code) keeps
its ``SefpMatMul`` node with a constant bits input; onnxruntime folds it to a float weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from otaro.errors import FormatError, OtaroError
from otaro.formats import onnx_ops as ops
from otaro.formats.sefp import derive_codes
from otaro.formats.table import TOP_BITS, SEFPFormat, check_bits
from otaro.runtime import libc
from otaro.runtime.decoder import LOGIT_ROWS
from otaro.runtime.artifact import ArtifactError
from otaro.runtime.spill import BuildFile, Spill

PrecisionSpec = Union[int, Mapping[str, int]]


# --------------------------------------------------------------------------- precision specs


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the bits of every quantized layer, in the artifact's layer order.
    ``bits`` is the cache key (``4`` and ``{"*": 4}`` are one entry); ``label`` is for people."""

    bits: tuple[int, ...]
    label: str
    head: int | None = None  # index of a quantized head (its own precision: not part of "uniform")

    @property
    def uniform(self) -> int | None:
        body = {b for i, b in enumerate(self.bits) if i != self.head}
        return body.pop() if len(body) == 1 else None


def spec_label(spec: PrecisionSpec) -> str:
    """``4`` -> ``"4"``; ``{"*": 4, "layers.0.*": 8}`` -> ``"*=4,layers.0.*=8"`` (what
    :func:`parse_precision` reads back)."""
    if isinstance(spec, Mapping):
        return ",".join(f"{p}={b}" for p, b in spec.items())
    return str(spec)


def parse_precision(text: str) -> PrecisionSpec:
    """``"4"`` -> 4; ``"*=4,layers.0.*=8"`` -> ``{"*": 4, "layers.0.*": 8}`` (command line)."""
    text = text.strip()
    try:
        if "=" not in text:
            return int(text)
        out: dict[str, int] = {}
        for part in text.split(","):
            pattern, _, bits = part.partition("=")
            if not pattern.strip():
                raise ValueError
            out[pattern.strip()] = int(bits)
        return out
    except ValueError:
        raise FormatError(f"cannot read precision {text!r}: use a bit-width like 4, or PATTERN=BITS pairs "
                          f"like '*=4,layers.0.*=8'") from None


def resolve_precision(spec: PrecisionSpec, layers: Sequence[str], prefix: str, allowed: Sequence[int],
                      current: Precision, head: tuple[str, int] | None = None) -> Precision:
    """Per-layer bits from an int or a ``{glob: bits}`` mapping, as ``otaro.modules`` does on the
    torch side: globs match layer names without the model prefix (or the full name), later
    entries win, unmatched layers keep ``current``, and a pattern matching nothing is an error
    (a typo must not silently do nothing). Everything is checked before anything changes.
    ``head`` = (name, default bits) of a quantized head: a bit-width resets it to its default,
    and only a pattern naming it (``lm_head``; not ``*``) changes it (otaro.head)."""
    from otaro.formats.precision import reaches_head

    head_name, head_bits = head if head is not None else (None, None)
    head_index = list(layers).index(head_name) if head_name in layers else None
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        b = check_bits(int(spec), allowed)
        return Precision(tuple(head_bits if n == head_name else b for n in layers), str(b), head_index)
    if not isinstance(spec, Mapping) or not spec:
        raise FormatError(f"precision must be a bit-width or a non-empty {{pattern: bits}} mapping, got {spec!r}")
    out = list(current.bits)
    short = [n.removeprefix(prefix) for n in layers]
    for pattern, bits in spec.items():
        if not isinstance(pattern, str):
            raise FormatError(f"precision pattern {pattern!r} is not a string")
        bits = check_bits(bits, allowed)
        hits = [i for i, (s, n) in enumerate(zip(short, layers))
                if (reaches_head(pattern, n, s) if n == head_name
                    else fnmatch.fnmatchcase(s, pattern) or fnmatch.fnmatchcase(n, pattern))]
        if not hits:
            raise FormatError(f"precision pattern {pattern!r} matches no quantized layer "
                              f"(names look like {short[0]!r})")
        for i in hits:
            out[i] = bits
    return Precision(tuple(out), spec_label(spec), head_index)


# --------------------------------------------------------------------------- the master


@dataclass(frozen=True)
class StoredLayer:
    """One quantized linear as stored: views into the master bytes."""

    name: str
    node: int  # index of its SefpMatMul node in the graph
    mantissa: np.ndarray  # int8 [K, N]
    scale8: np.ndarray  # float32 [ceil(K/G), N]

    @property
    def K(self) -> int:
        return self.mantissa.shape[0]

    @property
    def N(self) -> int:
        return self.mantissa.shape[1]


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


class Master:
    """The artifact's single SEFP model, read once: graph (no weight bytes), the external data
    bytes, and a view of every layer's stored code."""

    def __init__(self, root: Path, manifest: dict):
        model, sefp = manifest["model"], manifest["sefp"]
        self.fmt = SEFPFormat(group_size=sefp["group_size"], rounding=sefp["rounding"], scale=sefp.get("scale", "pow2"))
        self.function, self.domain = sefp["function"], sefp["domain"]
        head = manifest.get("head")
        self.head: tuple[str, int] | None = (head["layer"], head["bits"]) if head else None
        self.data_name = model["data"]
        try:
            self.proto = onnx.load(str(root / model["file"]), load_external_data=False)
        except Exception as e:  # protobuf raises its own DecodeError; any failure here is a bad file
            raise ArtifactError(f"{root / model['file']} is not a readable ONNX model ({e})") from None
        self.data = np.fromfile(root / self.data_name, dtype=np.uint8)
        inits = {t.name: t for t in self.proto.graph.initializer}
        for t in inits.values():
            if t.data_location == TensorProto.EXTERNAL:
                ext = _external(t)
                end = int(ext.get("offset", 0)) + int(ext.get("length", -1))
                if ext.get("location") != self.data_name or end > self.data.size or "length" not in ext:
                    raise ArtifactError(f"tensor {t.name} points outside {self.data_name} (corrupt or foreign model)")
        stored = {f"{n}.{k}" for n in manifest["layers"] for k in ("mantissa", "scale8")}
        # Stored codes that other nodes read too (a quantized tied embedding's SefpGather reads
        # the head's): kept in every precision's graph and shared, not replaced by packed ones.
        self.also_read = {i for n in self.proto.graph.node if n.op_type != self.function
                          for i in n.input if i in stored}
        # Float weights big enough to be external (small ones stay inline in the graph).
        self.shared = {n: self._array(t) for n, t in inits.items()
                       if t.data_location == TensorProto.EXTERNAL and (n not in stored or n in self.also_read)}
        # Before the node indices below are taken: removing the tied head's Transpose shifts
        # every later node (an IndexError on graphs where it comes before the layers, as
        # Gemma-style exports have it).
        self._share_transposed_heads(inits)
        nodes = {n.input[1]: i for i, n in enumerate(self.proto.graph.node)
                 if n.domain == self.domain and n.op_type == self.function}
        self.layers: dict[str, StoredLayer] = {}
        for name in manifest["layers"]:
            m_name, s_name = f"{name}.mantissa", f"{name}.scale8"
            if m_name not in nodes or m_name not in inits or s_name not in inits:
                raise ArtifactError(f"the model has no {self.function} node for layer {name} "
                                    f"(corrupt or foreign model)")
            self.layers[name] = StoredLayer(name, nodes[m_name], self._array(inits[m_name]), self._array(inits[s_name]))

    def uniform(self, bits: int) -> Precision:
        """Every decoder layer at ``bits``; a quantized head at its own bits."""
        return resolve_precision(bits, list(self.layers), "", [bits], None, self.head)

    def _share_transposed_heads(self, inits: dict[str, TensorProto]) -> None:
        """A tied head is stored once, as ``Transpose(embedding)`` (see export/rewrite.py).
        onnxruntime folds that per session: a copy of the whole head and its time on every
        switch. Transpose it once here instead; every session borrows the result."""
        g = self.proto.graph
        for i in reversed(range(len(g.node))):
            n = g.node[i]
            perm = [list(a.ints) for a in n.attribute if a.name == "perm"]
            if n.op_type != "Transpose" or len(n.input) != 1 or n.input[0] not in self.shared \
                    or self.shared[n.input[0]].ndim != 2 or perm not in ([], [[1, 0]]):
                continue
            src = inits[n.input[0]]
            head = np.ascontiguousarray(self.shared[n.input[0]].T)
            # A graph initializer for the name (add_initializer overrides an existing one): it
            # points at the source's bytes, which have the right size; the value is replaced.
            t = TensorProto(name=n.output[0], data_type=src.data_type, dims=head.shape,
                            data_location=TensorProto.EXTERNAL)
            t.external_data.extend(src.external_data)
            g.initializer.append(t)
            self.shared[n.output[0]] = head
            del g.node[i]

    def _array(self, t: TensorProto) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        ext = _external(t)
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        off, n = int(ext.get("offset", 0)), int(ext["length"])
        return self.data[off:off + n].view(dtype).reshape(tuple(t.dims))


# --------------------------------------------------------------------------- derive + pack


def _code_table(fmt: SEFPFormat, bits: int, container: int) -> np.ndarray:
    """uint8 [256]: stored int8 mantissa (indexed by its byte) -> derived code + 2^(c-1), the
    unsigned value MatMulNBits stores when the node has no zero points. One gather per weight
    instead of the arithmetic of ``derive_codes`` on every element."""
    m8 = np.arange(256, dtype=np.uint8).view(np.int8)
    m8 = np.where(m8 == -128, 0, m8).astype(np.int8)  # -128 is never stored (codes are [-127, 127])
    return (derive_codes(m8, bits, fmt) + 2 ** (container - 1)).astype(np.uint8)


_SIGN_FLIP = np.arange(256, dtype=np.uint8) ^ np.uint8(0x80)
_STORED = np.arange(256) != 0x80  # every byte but -128, which is never stored


def _is_sign_flip(table: np.ndarray) -> bool:
    """True when the table maps each stored byte to itself + 128 (mod 256): an 8-bit code in an
    8-bit container (the 8-bit head at every b, every layer at b = 8)."""
    return bool(np.array_equal(table[_STORED], _SIGN_FLIP[_STORED]))


def pack_layer(layer: StoredLayer, fmt: SEFPFormat, bits: int, container: int,
               out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, blocks, G*c/8], scales float32 [N, blocks]) of one layer at ``bits``: the same
    bytes as :func:`otaro.formats.pack.sefp_to_matmulnbits`, vectorised from the [K, N] layout.
    ``out``: arrays of those shapes to write into (rows of a sibling group's stacked weights)."""
    G, K, N = fmt.group_size, layer.K, layer.N
    blocks = -(-K // G)
    # Gather and pack along K in the stored [K, N] layout (contiguous rows), then one transpose
    # of the packed bytes: ~2x faster than gathering through the transposed view.
    # np.take, unlike fancy indexing, releases the GIL: layers pack in parallel threads.
    table = _code_table(fmt, bits, container)
    if _is_sign_flip(table):  # an 8-bit code is the stored byte + 128: one xor, ~10x a gather
        u = np.bitwise_xor(layer.mantissa.view(np.uint8), np.uint8(0x80))
    else:
        u = np.take(table, layer.mantissa.view(np.uint8))
    if blocks * G > K:  # the ragged last group is padded with code 0
        u = np.concatenate([u, np.full((blocks * G - K, N), 2 ** (container - 1), np.uint8)])
    per = 8 // container
    packed = u[0::per]
    for j in range(1, per):  # at most 3 whole-array steps (2-bit container)
        packed = packed | (u[j::per] << np.uint8(j * container))
    # scale at b = scale8 * 2^(8-b): a power of two, exact in fp32 (onnx_ops' function does the same).
    scales = (layer.scale8 * np.float32(2.0 ** (TOP_BITS - bits))).T
    if out is None:
        return np.ascontiguousarray(packed.T).reshape(N, blocks, G * container // 8), np.ascontiguousarray(scales)
    out[0].reshape(N, -1)[...] = packed.T
    out[1][...] = scales
    return out


# --------------------------------------------------------------------------- build a model


@dataclass(frozen=True)
class BuiltModel:
    """A precision's model ready for a session: graph bytes + its external data, either in
    memory (``files``) or in a spill folder (``folder``: the graph's external files are there;
    ``build_file`` is this build's, to discard once the session exists)."""

    model: bytes
    files: dict[str, np.ndarray]  # external file name -> bytes (uint8, contiguous); empty when spilled
    shared: dict[str, np.ndarray]  # initializers every session shares (views of the master bytes)
    packed_bytes: int  # bytes of the packed weights (what this precision adds)
    folder: Path | None = None
    build_file: "BuildFile | None" = None

    def discard(self) -> None:
        """Remove this build's spilled file (a session built from it keeps its own mappings)."""
        if self.build_file is not None:
            self.build_file.discard()


def _external_tensor(name: str, shape: tuple, dtype, location: str, offset: int = 0) -> TensorProto:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    t = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape,
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        t.external_data.add(key=k, value=v)
    return t


class _MemorySlots:
    """Packed weights as in-memory external files, one array per tensor: layers are packed
    straight into their rows (a sibling group's stacked array)."""

    def __init__(self, files: dict):
        self.files = files

    def tensor(self, name: str, shape: tuple, dtype) -> tuple[TensorProto, np.ndarray]:
        arr = np.empty(shape, dtype)
        loc = f"otaro-{len(self.files)}.bin"
        self.files[loc] = arr.reshape(-1).view(np.uint8)
        return _external_tensor(name, shape, dtype, loc), arr

    @staticmethod
    def fill(slots, lo: int, hi: int, pack: Callable) -> None:
        pack(tuple(arr[lo:hi] for _, arr in slots))


class _FileSlots:
    """Packed weights written to a spill file (:mod:`otaro.runtime.spill`): each layer is packed
    on its own and written to its rows' bytes, then freed."""

    def __init__(self, f: "BuildFile"):
        self.f = f

    def tensor(self, name: str, shape: tuple, dtype) -> tuple[TensorProto, tuple[int, int]]:
        row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        offset = self.f.reserve(shape[0] * row)
        return _external_tensor(name, shape, dtype, self.f.path.name, offset), (offset, row)

    def fill(self, slots, lo: int, hi: int, pack: Callable) -> None:
        for arr, (_, (offset, row)) in zip(pack(None), slots):
            self.f.write(arr, offset + lo * row)


def sibling_groups(graph: onnx.GraphProto, master: "Master", plan: Mapping[str, tuple[int, int | None]]
                   ) -> list[list[str]]:
    """Layers that become one MatMulNBits: two or more packed layers reading the same activation
    at the same bits and container (q/k/v, gate/up), in graph order. Each output column of
    MatMulNBits is its own dot product, so stacking the weights along N changes no number; a
    decode step runs 90 fewer nodes on a 30-layer model, and the bigger N splits better across
    threads."""
    by_key: dict[tuple, list[str]] = {}
    for n, (bits, c) in plan.items():
        if c is not None:
            by_key.setdefault((graph.node[master.layers[n].node].input[0], bits, c), []).append(n)
    return [sorted(v, key=lambda n: master.layers[n].node) for v in by_key.values() if len(v) > 1]


def _fuse_siblings(g: onnx.GraphProto, group: list[str], master: "Master", tensors: tuple[TensorProto, TensorProto],
                   plan: Mapping, accuracy_level: int, fmt: SEFPFormat, add: list,
                   readers: Mapping[str, list[int]]) -> tuple[set[int], dict[int, list]]:
    """One MatMulNBits for ``group`` (see :func:`sibling_groups`): ``tensors`` = the initializers
    of its packed weights and scales, stacked along N.
    Where the siblings' outputs only feed one Concat on the last axis in the same order (the
    fused graph's q/k/v), the packed node produces the Concat's output; elsewhere a Split gives
    each sibling its output back. Returns (node indices to drop, index -> nodes to put there)."""
    layers = [master.layers[n] for n in group]
    nodes = [g.node[l.node] for l in layers]
    outs = [n.output[0] for n in nodes]
    c = plan[group[0]][1]
    qweight, scales = tensors
    consumers = [readers.get(o, []) for o in outs]
    graph_outputs = {o.name for o in g.output}
    concat = None
    if all(len(cs) == 1 for cs in consumers) and len({cs[0] for cs in consumers}) == 1:
        cand = g.node[consumers[0][0]]
        axis = [a.i for a in cand.attribute if a.name == "axis"]
        if cand.op_type == "Concat" and list(cand.input) == outs and axis == [-1]:
            concat = consumers[0][0]
    if set(outs) & graph_outputs:
        concat = None
    name = qweight.name.removesuffix(".qweight")
    y = g.node[concat].output[0] if concat is not None else name + ".out"
    fused = ops.matmulnbits_node(nodes[0].input[0], qweight.name, scales.name, y,
                                 name=nodes[0].name.removesuffix(ops.SEFP_OP) + "Siblings/MatMulNBits",
                                 K=layers[0].K, N=sum(l.N for l in layers), bits=c, block_size=fmt.group_size,
                                 accuracy_level=accuracy_level)
    put = [fused]
    drop = {l.node for l in layers}
    if concat is not None:
        drop.add(concat)
    else:  # artifacts are opset 21 (ops.OPSET): Split takes its sizes as an input
        sizes = f"{name}.split"
        add.append(numpy_helper.from_array(np.array([l.N for l in layers], np.int64), sizes))
        put.append(onnx.helper.make_node("Split", [y, sizes], outs, name=name + "/Split", axis=-1))
    return drop, {layers[0].node: put}


# Bytes of stored code one pool task packs at most: a layer is cut into slices of output columns
# (rows of the packed weight) of about this size; on SmolLM2 that cuts only the tied head
# (49152 x 576, a fifth of the weights), which had been one task: packed last, it ran with the
# other threads idle; packed first, its whole-size temporaries (~28 MB each) left holes in the
# threads' heaps that a switch keeping its old precision then held (+8-57 MiB at its peak).
# Scratch runs on SmolLM2 (derive+pack of a cold switch; RSS after the load at b = 8): one task per
# layer 0.20-0.24 s; 1 MiB slices 0.12-0.15 s, same RSS; 4 MiB 0.13-0.16 s but +12 MB RSS;
# 16 MiB 0.16-0.22 s.
PACK_CHUNK_BYTES = 1 << 20


def _column_chunks(name: str, layer: StoredLayer) -> list[tuple[str, int, int]]:
    step = max(16, PACK_CHUNK_BYTES // max(layer.K, 1))
    return [(name, a, min(a + step, layer.N)) for a in range(0, layer.N, step)]


def build_model(master: Master, precision: Precision, containers: Callable[[int], int | None],
                accuracy_level: int, pool: Executor, fuse_siblings: bool = True, spill: "Spill | None" = None
                ) -> BuiltModel:
    """The model for ``precision``; ``containers(code_bits)`` is the backend's container choice
    (None: no container, keep the SefpMatMul node). ``fuse_siblings``: layers reading the same
    activation at the same bits run as one MatMulNBits (:func:`sibling_groups`). ``spill``: the
    packed weights go to a file in that folder instead of memory (:mod:`otaro.runtime.spill`)."""
    fmt = master.fmt
    names = list(master.layers)
    plan = {n: (b, containers(fmt.code_bits(b))) for n, b in zip(names, precision.bits)}
    groups = sibling_groups(master.proto.graph, master, plan) if fuse_siblings else []
    in_group = {n for grp in groups for n in grp}
    files: dict[str, np.ndarray] = {} if spill else {master.data_name: master.data}
    build_file = spill.new_file() if spill else None
    try:
        sink = _FileSlots(build_file) if build_file else _MemorySlots(files)
        # A unit is one MatMulNBits: a sibling group (layers packed into its rows) or one layer.
        units = groups + [[n] for n in names if plan[n][1] is not None and n not in in_group]
        unit_tensors, rows = [], {}  # rows: layer -> (its unit's slots, first row, end row)
        for unit in units:
            c, G = plan[unit[0]][1], fmt.group_size
            blocks = -(-master.layers[unit[0]].K // G)
            N = [master.layers[n].N for n in unit]
            base = unit[0] + ".siblings" if len(unit) > 1 else unit[0]
            slots = (sink.tensor(f"{base}.qweight", (sum(N), blocks, G * c // 8), np.uint8),
                     sink.tensor(f"{base}.scales", (sum(N), blocks), np.float32))
            unit_tensors.append(tuple(t for t, _ in slots))
            for n, lo, hi in zip(unit, np.cumsum([0] + N[:-1]), np.cumsum(N)):
                rows[n] = (slots, int(lo), int(hi))

        def pack(item: tuple[str, int, int]) -> None:
            n, a, b = item
            slots, lo, _ = rows[n]
            layer = master.layers[n]
            if (a, b) != (0, layer.N):  # a slice of output columns: views, no copy
                layer = dataclasses.replace(layer, mantissa=layer.mantissa[:, a:b], scale8=layer.scale8[:, a:b])
            sink.fill(slots, lo + a, lo + b, lambda out: pack_layer(layer, fmt, plan[n][0], plan[n][1], out))

        list(pool.map(pack, [c for n in rows for c in _column_chunks(n, master.layers[n])]))
        if build_file:
            build_file.close()
        return _edit_graph(master, plan, groups, units, unit_tensors, accuracy_level, files, spill, build_file)
    except BaseException:
        if build_file:
            build_file.discard()
        raise


def _edit_graph(master: Master, plan: Mapping, groups: list[list[str]], units: list[list[str]],
                unit_tensors: list[tuple], accuracy_level: int, files: dict, spill: "Spill | None",
                build_file: "BuildFile | None") -> BuiltModel:
    """The precision's graph: each unit's SefpMatMul node(s) become one MatMulNBits."""
    fmt = master.fmt
    by_first = {u[0]: t for u, t in zip(units, unit_tensors)}
    head_out = _head_output(master)
    proto = onnx.ModelProto()
    proto.CopyFrom(master.proto)  # graph only: every big tensor is an external reference
    g = proto.graph
    drop: set[str] = set()
    add: list[TensorProto] = [t for ts in unit_tensors for t in ts]
    kept_bits: set[int] = set()
    in_group = {n for grp in groups for n in grp}
    drop_nodes: set[int] = set()
    put_nodes: dict[int, list] = {}
    readers: dict[str, list[int]] = {}  # tensor -> indices of the nodes that read it
    if groups:
        for i, node in enumerate(g.node):
            for x in set(node.input):
                readers.setdefault(x, []).append(i)
    for grp in groups:
        d, p = _fuse_siblings(g, grp, master, by_first[grp[0]], plan, accuracy_level, fmt, add, readers)
        drop_nodes |= d
        put_nodes.update(p)
        drop |= {f"{n}.{k}" for n in grp for k in ("mantissa", "scale8")}
    for n, (bits, c) in plan.items():
        layer, node = master.layers[n], g.node[master.layers[n].node]
        if n in in_group:
            continue
        if c is None:
            kept_bits.add(bits)
            node.input[3] = f"{ops.BITS_INPUT}.{bits}"
            continue
        qweight, scales = by_first[n]
        drop |= {f"{n}.mantissa", f"{n}.scale8"}
        node.CopyFrom(ops.matmulnbits_node(node.input[0], qweight.name, scales.name, node.output[0],
                                           name=node.name.removesuffix(ops.SEFP_OP) + "MatMulNBits",
                                           K=layer.K, N=layer.N, bits=c, block_size=fmt.group_size,
                                           accuracy_level=accuracy_level))
    if groups:  # one pass: node indices stay valid until here
        new_nodes = []
        for i, node in enumerate(g.node):
            new_nodes += put_nodes.get(i, [])
            if i not in drop_nodes:
                new_nodes.append(node)
        g.ClearField("node")
        g.node.extend(new_nodes)
    if head_out is not None:
        _gather_logit_rows(g, head_out)
    drop -= master.also_read
    drop |= {ops.BITS_INPUT, ops.HEAD_BITS_INPUT}  # each kept node reads its own constant below
    add += [numpy_helper.from_array(np.array(b, np.int64), f"{ops.BITS_INPUT}.{b}") for b in sorted(kept_bits)]
    keep = [t for t in g.initializer if t.name not in drop]
    g.ClearField("initializer")
    g.initializer.extend(keep + add)
    if not kept_bits:  # no SefpMatMul left (a SefpGather of a quantized embedding may be)
        keep_fns = [f for f in proto.functions if f.name != master.function]
        del proto.functions[:]
        proto.functions.extend(keep_fns)
    if spill:  # the artifact's bytes the graph still points at, in the folder's sparse copy
        spill.cover([(int(e["offset"]), int(e["length"])) for e in map(_external, keep)
                     if e.get("location") == master.data_name])
    packed = sum(int(_external(t)["length"]) for ts in unit_tensors for t in ts)
    return BuiltModel(proto.SerializeToString(), files, master.shared, packed,
                      spill.folder if spill else None, build_file)


def _head_output(master: Master) -> str | None:
    """The output of the node that computes the logits from the last hidden state: the quantized
    head's node, or a plain MatMul producing the graph's ``logits``; None when neither is found
    (the graph then computes every position's logits, as exported)."""
    g = master.proto.graph
    if master.head is not None and master.head[0] in master.layers:
        return g.node[master.layers[master.head[0]].node].output[0]
    node = next((n for n in g.node if "logits" in n.output), None)
    if node is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return node.output[0]
    return None


def _gather_logit_rows(g: onnx.GraphProto, head_out: str) -> None:
    """Compute the logits only at the positions the caller asks for (graph input
    ``LOGIT_ROWS`` [batch, k, 1], indices into each row's new tokens): a ``GatherND`` of those
    rows of the hidden state, before the head. Generation needs one position per row, and the
    head over a whole prompt was ~15% of a 128-token prefill on SmolLM2 and, at [T, vocab]
    floats, the largest allocation of a long prompt (400 MB at 2,000 tokens)."""
    i = next(i for i, n in enumerate(g.node) if head_out in n.output)
    hidden = g.node[i].input[0]
    rows = hidden + "/otaro_logit_rows"
    g.node[i].input[0] = rows
    g.node.insert(i, onnx.helper.make_node("GatherND", [hidden, LOGIT_ROWS], [rows], name="/otaro/logit_rows",
                                           batch_dims=1))
    g.input.append(onnx.helper.make_tensor_value_info(LOGIT_ROWS, TensorProto.INT64, ["batch_size", "logit_rows", 1]))
    for out in g.output:
        if out.name == "logits" and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].dim_param = "logit_rows"


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class SwitchReport:
    """What one switch cost. ``extra_bytes`` is the growth of the process's resident memory
    over the switch (Linux ``/proc``; elsewhere the estimate the cache budgets with)."""

    spec: str
    seconds: float
    derive_seconds: float  # derive codes + pack + build the graph
    session_seconds: float  # onnxruntime session creation
    extra_bytes: int
    cached: bool


@dataclass(frozen=True)
class Entry:
    """A warm precision: its session (wrapped for decoding) and what the cache charges for it."""

    bits: tuple[int, ...]
    decoder: object  # otaro.runtime.decoder.Decoder
    cost: int  # bytes the cache charges: measured growth, at least the packed weights
    keep: tuple = ()  # what the session borrows memory from (shared initializers)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_LIBC = None


def _libc():
    """glibc, or False where there is none (other libcs, other systems)."""
    global _LIBC
    if _LIBC is None:
        lib = libc.load()
        _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
    return _LIBC


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Building a session allocates and frees hundreds of MiB of temporaries (our packed arrays,
    onnxruntime's copy of them before it prepacks), much of it on onnxruntime's threads, and
    glibc keeps what a thread's arena frees resident in the process: on SmolLM2 ~100-230 MiB of
    RSS that nothing uses (docs/DESIGN.md §7.18)."""
    if _libc():
        _LIBC.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
BIG_BLOCK = 1 << 20
HEAP_BLOCK_MAX = 32 << 20  # glibc's ceiling for its dynamic threshold on 64-bit systems


@contextlib.contextmanager
def big_blocks_mapped():
    """While onnxruntime builds a session, serve heap blocks of 1 MiB and more from their own
    mappings (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere, or where the user set
    ``MALLOC_MMAP_THRESHOLD_``), so that the session's prepacked weights (0.3-2 MiB per layer)
    go back to the OS when it is dropped. In the threads' heaps, where glibc's raised threshold
    put them, the holes they left stayed resident even after ``malloc_trim``: +50-115 MiB on
    SmolLM2 after a few switches (docs/DESIGN.md §7.18). Afterwards the threshold is glibc's
    ceiling, where its own adjustment ends up: numpy's temporaries while packing stay on the
    heap (mapping each afresh made packing ~30% slower)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not _libc():
        yield
        return
    with _THRESHOLD_LOCK:
        _LIBC.mallopt(M_MMAP_THRESHOLD, BIG_BLOCK)
        try:
            yield
        finally:
            _LIBC.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)


_THRESHOLD_LOCK = threading.Lock()


class SessionCache:
    """Warm precisions besides the pinned (active) one, within ``budget`` bytes, least recently
    used out first. The pinned one is never evicted; a request that holds an evicted entry keeps
    using it (the session lives as long as someone references it)."""

    def __init__(self, budget: int, build: Callable[[tuple[int, ...]], tuple[Entry, float, float]]):
        if budget < 0:
            raise OtaroError(f"cache_bytes must be >= 0, got {budget}")
        self.budget, self._build = budget, build
        self._entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self._lock = threading.Lock()  # the dict
        self._build_lock = threading.Lock()  # one build at a time (they use every core already)
        self.pinned: tuple[int, ...] | None = None

    @property
    def keys(self) -> list[tuple[int, ...]]:
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, precision: Precision, pin: bool = False,
            before_build: Callable[[list[tuple[int, ...]]], None] | None = None) -> tuple[Entry, SwitchReport]:
        """The entry of ``precision``, built on a miss. ``pin``: it becomes the active one; what
        the cache would then evict goes before the build, and ``before_build(keys)`` is told
        (so a caller can let go of its references: the build never runs beside them)."""
        t0 = time.perf_counter()
        with self._lock:
            e = self._hit(precision.bits, pin)
        if e is not None:
            return e, SwitchReport(precision.label, time.perf_counter() - t0, 0.0, 0.0, 0, True)
        with self._build_lock:
            with self._lock:  # built by another thread while we waited?
                e = self._hit(precision.bits, pin)
            if e is not None:
                return e, SwitchReport(precision.label, time.perf_counter() - t0, 0.0, 0.0, 0, True)
            if pin:
                with self._lock:
                    gone = self._make_room()
                if gone and before_build is not None:
                    before_build(gone)
            rss0 = rss_bytes()
            e, derive_s, session_s = self._build(precision.bits)  # it hands freed memory back itself
            rss1 = rss_bytes()
            extra = max(0, rss1 - rss0) if rss0 is not None and rss1 is not None else e.cost
            # onnxruntime holds more than the packed bytes (pre-packed copies, folded constants):
            # charge what the process grew by when that is larger.
            e = dataclasses.replace(e, cost=max(e.cost, extra))
            with self._lock:
                self._entries[precision.bits] = e
                if pin:
                    self.pinned = precision.bits
                self._evict()
        return e, SwitchReport(precision.label, time.perf_counter() - t0, derive_s, session_s, extra, False)

    def _hit(self, bits, pin) -> Entry | None:
        e = self._entries.get(bits)
        if e is not None:
            self._entries.move_to_end(bits)
            if pin:
                self.pinned = bits
                self._evict()
        return e

    def _make_room(self) -> list[tuple[int, ...]]:
        """Before building a precision that will be pinned: evict now what :meth:`_evict` would
        evict once it is (the entry pinned so far is an ordinary one from then on)."""
        self.pinned = None
        before = list(self._entries)
        self._evict()
        return [k for k in before if k not in self._entries]

    def _evict(self) -> None:
        total = sum(e.cost for k, e in self._entries.items() if k != self.pinned)
        for k in list(self._entries):
            if total <= self.budget:
                break
            if k != self.pinned:
                total -= self._entries.pop(k).cost

