"""The ONNX forms of a quantized linear (torch-free: the exporter writes them, the runtime
rewrites them).

Two forms (DESIGN.md §7.9):

* ``ai.otaro.SefpMatMul(X, mantissa, scale8, bits) -> Y`` — the single SEFP model. A
  **model-local function** whose body is standard ONNX (opset 21): derive the b-bit codes from
  the stored int8 mantissas with integer ops, blocked ``DequantizeLinear`` along K, ``MatMul``.
  Stock runtimes inline the body; when ``bits`` is a constant, onnxruntime folds the derivation
  at load and fuses DQ+MatMul into ``MatMulNBits`` (8-bit container). Our runtime replaces the
  node by a ``MatMulNBits`` in the right container instead.
* ``com.microsoft.MatMulNBits`` — fixed-precision variants (SEFP at one b, integer GPTQ/AWQ/RTN).

Layouts: ``mantissa`` is int8 ``[K, N]`` (the transposed weight, K = in_features, unpadded),
``scale8`` float32 ``[ceil(K/G), N]`` = the b = 8 step ``2^(E - 6 - x)``; at b the step is
``scale8 · 2^(8-b)``. The derivation nodes come from the format table's one definition
(:class:`OnnxOps` emits them); ssfp rows use the same body, their scale8 being fp16 values.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from otaro.errors import FormatError
from otaro.formats.sefp import SEFPTensor, step_scale
from otaro.formats.table import ALL_BITS, TOP_BITS, SEFPFormat

DOMAIN = "ai.otaro"
DOMAIN_VERSION = 1
SEFP_OP = "SefpMatMul"
GATHER_OP = "SefpGather"  # a quantized embedding: rows of a stored [K, N] code, decoded at fixed bits
MS_DOMAIN = "com.microsoft"
BITS_INPUT = "sefp_bits"
HEAD_BITS_INPUT = "sefp_head_bits"  # a quantized head's own precision in the single model (otaro.head)
EMBED_BITS_INPUT = "sefp_embed_bits"  # the constant precision a quantized embedding decodes at
OPSET = 21  # blocked DequantizeLinear
IR_VERSION = 10  # what opset 21 needs; ORT >= 1.20 loads it (onnx 1.23 would stamp 14)

_MIN_BITS = min(ALL_BITS)
# 2^(8-b) for b = 2..8, looked up with Gather: exact in int32 and float32 on every runtime
# (a float Pow would be too, on IEEE libms, but a table leaves nothing to trust).
_SHIFT_TABLE = [2 ** (TOP_BITS - b) for b in ALL_BITS]


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


class OnnxOps:
    """The integer operations of a derivation (otaro.formats.table), emitted as ONNX nodes on
    int32 tensors. Integer ``Div`` truncates toward zero, which is floor for the non-negative
    operands derivations use; ``Mod`` (fmod=0) is the floor modulo."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def _out(self) -> str:
        self._n += 1
        return f"d{self._n}"

    def _node(self, op: str, *inputs: str) -> str:
        out = self._out()
        self.nodes.append(helper.make_node(op, list(inputs), [out]))
        return out

    def c(self, v: int) -> str:
        out = self._out()
        self.nodes.append(_const(out, np.array(v, np.int32)))
        return out

    def add(self, a, b):
        return self._node("Add", a, b)

    def mul(self, a, b):
        return self._node("Mul", a, b)

    def floordiv(self, a, b):
        return self._node("Div", a, b)

    def mod(self, a, b):
        return self._node("Mod", a, b)

    def minimum(self, a, b):
        return self._node("Min", a, b)


def _decode_nodes(fmt: SEFPFormat) -> list[onnx.NodeProto]:
    """Nodes from (m32 int32, p int32 = 2^(8-b)) to ``codes``: the format table's derivation on
    |m|, then the sign (Sign(0) = 0 keeps a stored zero at zero)."""
    o = OnnxOps()
    o.nodes += [helper.make_node("Abs", ["m32"], ["a"]), helper.make_node("Sign", ["m32"], ["sg"])]
    lim = o.add(o.floordiv(o.c(2 ** (TOP_BITS - 1)), "p"), o.c(-1))  # 2^(b-1) - 1 = 128/p - 1
    mag = fmt.derive(o, "a", "p", lim)
    o.nodes.append(helper.make_node("Mul", [mag, "sg"], ["q"]))
    # The widest signed code (midpoint's ±255 at b = 8) needs int16 for DequantizeLinear.
    to = TensorProto.INT8 if fmt.code_bits(TOP_BITS) <= 8 else TensorProto.INT16
    o.nodes.append(helper.make_node("Cast", ["q"], ["codes"], to=to))
    return o.nodes


def function_name(fmt: SEFPFormat) -> str:
    # One function per (group size, rounding): the body bakes both in.
    return f"{SEFP_OP}_g{fmt.group_size}_{fmt.rounding}"


def _dequant_nodes(fmt: SEFPFormat, mantissa: str, scale8: str, out: str) -> list[onnx.NodeProto]:
    """Nodes from a stored code (``mantissa`` int8 [K, ...], ``scale8`` [ceil(K/G), ...]) and the
    ``bits`` input to its float value at b (``out``): the 2^(8-b) lookups, the table's
    derivation, the step at b, blocked DequantizeLinear along K. Shared by both functions."""
    return [
        _const("tab_i", np.array(_SHIFT_TABLE, np.int32)),
        _const("tab_f", np.array(_SHIFT_TABLE, np.float32)),
        _const("bmin", np.array(_MIN_BITS, np.int64)),
        helper.make_node("Sub", ["bits", "bmin"], ["idx"]),
        helper.make_node("Gather", ["tab_i", "idx"], ["p"], axis=0),
        helper.make_node("Gather", ["tab_f", "idx"], ["pf"], axis=0),
        helper.make_node("Cast", [mantissa], ["m32"], to=TensorProto.INT32),
        *_decode_nodes(fmt),
        helper.make_node("Mul", [scale8, "pf"], ["scale"]),
        helper.make_node("DequantizeLinear", ["codes", "scale"], [out], axis=0, block_size=fmt.group_size),
    ]


def sefp_function(fmt: SEFPFormat) -> onnx.FunctionProto:
    """The model-local function for ``fmt``."""
    nodes = [*_dequant_nodes(fmt, "mantissa", "scale8", "w"), helper.make_node("MatMul", ["X", "w"], ["Y"])]
    return helper.make_function(
        DOMAIN, function_name(fmt), ["X", "mantissa", "scale8", "bits"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )


def gather_function_name(fmt: SEFPFormat) -> str:
    return f"{GATHER_OP}_g{fmt.group_size}_{fmt.rounding}"


def sefp_gather_function(fmt: SEFPFormat) -> onnx.FunctionProto:
    """``SefpGather(ids, mantissa, scale8, bits) -> rows``: embedding rows read from a stored code in
    the linear layout (``mantissa [K, N]``, K = hidden, N = vocab), so a tied head and its
    embedding share one tensor. Gather along N gives ``[K, *ids.shape]``; the dequantization is
    the matmul's (blocked along K, ragged last group included); a Transpose puts K last. Only the
    gathered rows are ever decoded (ids are not constant: nothing folds)."""
    nodes = [
        helper.make_node("Gather", ["mantissa", "ids"], ["mrows"], axis=1),
        helper.make_node("Gather", ["scale8", "ids"], ["srows"], axis=1),
        *_dequant_nodes(fmt, "mrows", "srows", "w"),
        # [K, batch, seq] -> [batch, seq, K]: ids of an embedding lookup are [batch, seq].
        helper.make_node("Transpose", ["w"], ["rows"], perm=[1, 2, 0]),
    ]
    return helper.make_function(
        DOMAIN, gather_function_name(fmt), ["ids", "mantissa", "scale8", "bits"], ["rows"], nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )


def sefp_gather_node(fmt: SEFPFormat, ids: str, mantissa: str, scale8: str, y: str, name: str,
                     bits: str) -> onnx.NodeProto:
    return helper.make_node(gather_function_name(fmt), [ids, mantissa, scale8, bits], [y], name=name, domain=DOMAIN)


def sefp_initializers(t: SEFPTensor) -> tuple[np.ndarray, np.ndarray]:
    """(mantissa int8 [K, N], scale8 float32 [ceil(K/G), N]) of an encoded weight."""
    K = t.in_features
    groups = -(-K // t.fmt.group_size)
    mant = np.ascontiguousarray(t.mantissa[:, :K].T)
    scale8 = step_scale(t.shared[:, :groups], TOP_BITS, t.fmt)
    return mant, np.ascontiguousarray(scale8.T)


def sefp_node(fmt: SEFPFormat, x: str, mantissa: str, scale8: str, y: str, name: str,
              bits: str = BITS_INPUT) -> onnx.NodeProto:
    return helper.make_node(function_name(fmt), [x, mantissa, scale8, bits], [y], name=name, domain=DOMAIN)


def matmulnbits_node(x: str, b: str, scales: str, y: str, name: str, *, K: int, N: int, bits: int,
                     block_size: int, accuracy_level: int, zero_points: str | None = None) -> onnx.NodeProto:
    inputs = [x, b, scales] + ([zero_points] if zero_points else [])
    return helper.make_node(
        "MatMulNBits", inputs, [y], name=name, domain=MS_DOMAIN,
        K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
    )


def sefp_from_initializers(mantissa: np.ndarray, scale8: np.ndarray, fmt: SEFPFormat) -> SEFPTensor:
    """Inverse of :func:`sefp_initializers` (the runtime reads the stored model back)."""
    K, N = mantissa.shape
    G = fmt.group_size
    groups = -(-K // G)
    if mantissa.dtype != np.int8 or scale8.shape != (groups, N):
        raise FormatError(f"SEFP initializers have shapes {mantissa.shape}/{scale8.shape}, expected [K, N]/[{groups}, N]")
    m = np.zeros((N, groups * G), np.int8)
    m[:, :K] = mantissa.T
    x = fmt.rounding_spec.extra_code_bits
    if fmt.scale == "fp16":
        # scale8 = Δ8 · 2^-x with Δ8 an fp16 value: scaling back by 2^x is exact.
        return SEFPTensor(m, np.ldexp(scale8.T.astype(np.float32), x).astype(np.float16), K, fmt)
    _, e = np.frexp(scale8.T.astype(np.float32))
    # scale8 = 2^(E - 6 - x) exactly, so frexp's exponent is (E - 6 - x) + 1.
    E = (e.astype(np.int32) - 1) + TOP_BITS - 2 + x
    return SEFPTensor(m, E.astype(np.int8), K, fmt)
