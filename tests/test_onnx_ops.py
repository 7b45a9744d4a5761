"""The ONNX forms of a quantized linear, run in onnxruntime against the numpy codec."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from otaro.formats.table import SEFP_ROUNDINGS
from otaro.formats import SEFPFormat, sefp
from otaro.formats import onnx_ops as ops
from otaro.formats.pack import sefp_to_matmulnbits

K, N = 100, 24  # K not a multiple of the group: the ragged last block must work too


def _model(nodes, inits, funcs=(), inputs=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K]), *inputs],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    m = helper.make_model(g, functions=list(funcs), ir_version=ops.IR_VERSION, opset_imports=[
        helper.make_opsetid("", ops.OPSET), helper.make_opsetid(ops.DOMAIN, 1), helper.make_opsetid(ops.MS_DOMAIN, 1)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _session(m):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # exact
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _encoded(rounding, seed=0, scale="pow2"):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * rng.lognormal(0, 2, (N, 1))).astype(np.float32)
    w[3, :] = 0  # an all-zero row: sentinel exponents
    return sefp.encode(w, SEFPFormat(16, rounding, scale=scale))


ROWS = [(r, k) for k in ("pow2", "fp16") for r in sorted(SEFP_ROUNDINGS) if k == "pow2" or not SEFP_ROUNDINGS[r].legacy]


def _check(y, x, t, bits):
    ref = x @ sefp.decode(t, bits).T
    # Every decoded weight is exact in fp32 (DESIGN §7.1); only the summation order differs.
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("rounding, scale", ROWS)
def test_sefp_function_is_bit_exact_with_the_codec_at_every_bits(rounding, scale):
    """The ONNX body is emitted from the same derivation as the numpy codec: with X = I every
    output is one product, so Y must equal the decoded weight bit for bit."""
    t = _encoded(rounding, scale=scale)
    mant, scale8 = ops.sefp_initializers(t)
    eye = np.eye(K, dtype=np.float32)
    for bits in range(2, 9):
        m = _model([ops.sefp_node(t.fmt, "X", "M", "S", "Y", "n")],
                   [numpy_helper.from_array(mant, "M"), numpy_helper.from_array(scale8, "S"),
                    numpy_helper.from_array(np.array(bits, np.int64), ops.BITS_INPUT)], [ops.sefp_function(t.fmt)])
        y = _session(m).run(None, {"X": eye})[0]
        np.testing.assert_array_equal(y.T, sefp.decode(t, bits))


@pytest.mark.parametrize("rounding, scale", ROWS)
def test_sefp_function_matches_the_codec_at_every_bits(rounding, scale):
    t = _encoded(rounding, scale=scale)
    mant, scale8 = ops.sefp_initializers(t)
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    for bits in range(2, 9):
        m = _model([ops.sefp_node(t.fmt, "X", "M", "S", "Y", "n")],
                   [numpy_helper.from_array(mant, "M"), numpy_helper.from_array(scale8, "S"),
                    numpy_helper.from_array(np.array(bits, np.int64), ops.BITS_INPUT)], [ops.sefp_function(t.fmt)])
        _check(_session(m).run(None, {"X": x})[0], x, t, bits)


def test_bits_as_a_graph_input_switches_per_run():
    t = _encoded("trunc")
    mant, scale8 = ops.sefp_initializers(t)
    m = _model([ops.sefp_node(t.fmt, "X", "M", "S", "Y", "n")],
               [numpy_helper.from_array(mant, "M"), numpy_helper.from_array(scale8, "S")], [ops.sefp_function(t.fmt)],
               [helper.make_tensor_value_info(ops.BITS_INPUT, TensorProto.INT64, [])])
    s = _session(m)
    x = np.ones((1, K), np.float32)
    for bits in (8, 3, 8):
        _check(s.run(None, {"X": x, ops.BITS_INPUT: np.array(bits, np.int64)})[0], x, t, bits)


@pytest.mark.parametrize("rounding, scale", ROWS)
def test_initializers_round_trip_to_the_tensor(rounding, scale):
    t = _encoded(rounding, scale=scale)
    back = ops.sefp_from_initializers(*ops.sefp_initializers(t), t.fmt)
    np.testing.assert_array_equal(back.mantissa, t.mantissa)
    np.testing.assert_array_equal(back.shared, t.shared)
    assert back.in_features == t.in_features


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matmulnbits_node_matches_the_codec(bits):
    t = _encoded("trunc")
    B, scales, c = sefp_to_matmulnbits(t, bits)
    m = _model([ops.matmulnbits_node("X", "B", "S", "Y", "n", K=K, N=N, bits=c, block_size=16, accuracy_level=1)],
               [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "S")])
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
    _check(_session(m).run(None, {"X": x})[0], x, t, bits)


@pytest.mark.parametrize("rounding, scale", ROWS)
def test_runtime_packing_is_the_reference_packing_byte_for_byte(rounding, scale):
    """The runtime's vectorised derive + pack (a table gather, or an xor where an 8-bit code is
    the stored byte + 128) gives exactly sefp_to_matmulnbits's bytes at every b, also when
    written into a sibling group's rows."""
    from otaro.runtime.switch import StoredLayer, pack_layer

    t = _encoded(rounding, scale=scale)
    mant, scale8 = ops.sefp_initializers(t)
    layer = StoredLayer("l", 0, mant, scale8)
    for bits in range(2, 9):
        if t.fmt.container_bits(bits) is None:
            continue  # no container (midpoint at 8 bits keeps its SefpMatMul node)
        B, S, c = sefp_to_matmulnbits(t, bits)
        got_B, got_S = pack_layer(layer, t.fmt, bits, c)
        np.testing.assert_array_equal(got_B.reshape(B.shape), B, err_msg=f"b={bits}")
        np.testing.assert_array_equal(got_S.reshape(S.shape), S)
        rows = (np.zeros((N + 5, *got_B.shape[1:]), np.uint8), np.zeros((N + 5, got_S.shape[1]), np.float32))
        pack_layer(layer, t.fmt, bits, c, out=(rows[0][5:], rows[1][5:]))
        np.testing.assert_array_equal(rows[0][5:], got_B)
        np.testing.assert_array_equal(rows[1][5:], got_S)
