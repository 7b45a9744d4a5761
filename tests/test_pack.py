"""Packed layouts: bit-planes (kernels) and onnxruntime MatMulNBits (exporter), checked by round
trips, by what a b-bit kernel may read, and against onnxruntime itself."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaro.errors import FormatError
from otaro.formats import ALL_BITS, CONTAINERS, FORMATS, GROUP_SIZES, IntFormat, SEFPFormat
from otaro.formats import intq, sefp
from otaro.formats.pack import (
    N_PLANES,
    NONZERO_PLANE,
    SIGN_PLANE,
    bitplane_bytes_read,
    int_to_matmulnbits,
    needs_nonzero_plane,
    pack_bitplanes,
    pack_matmulnbits,
    pack_matmulnbits_unsigned,
    pack_sefp_bitplanes,
    pack_zero_points,
    plane_indices,
    sefp_to_matmulnbits,
    unpack_bitplanes,
    unpack_bitplanes_for,
    unpack_matmulnbits,
    unpack_matmulnbits_unsigned,
    unpack_zero_points,
)

SEFP_ROWS = [f for f in FORMATS.values() if isinstance(f, SEFPFormat)]
INT_ROWS = [f for f in FORMATS.values() if isinstance(f, IntFormat)]
FAST = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mantissas(draw):
    """int8 sign-magnitude codes [-127, 127], many zeros and small magnitudes (the hard cases
    for midpoint's zero test), in [out, in_p] with in_p a multiple of 8."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out, in_p = draw(st.integers(1, 5)), 8 * draw(st.integers(1, 24))
    m = rng.integers(-127, 128, (out, in_p))
    small = rng.random((out, in_p)) < 0.4
    m = np.where(small, rng.integers(-3, 4, (out, in_p)), m)
    return m.astype(np.int8)


# --------------------------------------------------------------------------- bit-planes


@FAST
@given(mantissas())
def test_bitplanes_round_trip(m):
    p = pack_bitplanes(m)
    assert p.shape == (N_PLANES, m.shape[0], m.shape[1] // 8) and p.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bitplanes(p), m)
    p9 = pack_bitplanes(m, nonzero_plane=True)
    assert p9.shape[0] == N_PLANES + 1
    np.testing.assert_array_equal(p9[:N_PLANES], p)
    np.testing.assert_array_equal(unpack_bitplanes(p9), m)


def test_bitplane_bit_order_is_documented():
    # element k of a row lives in byte k // 8 at bit k % 8; plane 1 is the top magnitude bit
    m = np.zeros((1, 16), np.int8)
    m[0, 10] = -64  # sign set, magnitude 0b1000000 -> plane 1 only
    m[0, 3] = 1  # magnitude bit 0 -> plane 7
    p = pack_bitplanes(m, nonzero_plane=True)
    assert p[SIGN_PLANE, 0].tolist() == [0, 1 << 2]
    assert p[1, 0].tolist() == [0, 1 << 2]
    assert p[7, 0].tolist() == [1 << 3, 0]
    assert not p[2:7].any()
    assert p[NONZERO_PLANE, 0].tolist() == [1 << 3, 1 << 2]


@FAST
@given(mantissas(), st.sampled_from(ALL_BITS))
def test_trunc_kernel_reads_only_b_planes(m, b):
    trunc = FORMATS["sefp-g64-trunc"]
    p = pack_bitplanes(m)
    np.testing.assert_array_equal(
        sefp.derive_codes(unpack_bitplanes(p, b), b, trunc), sefp.derive_codes(m, b, trunc)
    )


@FAST
@given(mantissas(), st.sampled_from(SEFP_ROWS), st.sampled_from(ALL_BITS), st.integers(0, 2**32 - 1))
def test_kernel_planes_suffice_for_every_rounding(m, fmt, b, seed):
    """A b-bit kernel reads exactly plane_indices(fmt, b) (fmt.planes_read(b) planes): garbage
    in every other plane changes none of its derived codes."""
    idx = plane_indices(fmt, b)
    assert len(idx) == len(set(idx)) == fmt.planes_read(b)
    assert idx[: min(b, 8)] == tuple(range(min(b, 8)))  # sign + top b-1 magnitude bits first
    p = pack_bitplanes(m, nonzero_plane=needs_nonzero_plane(fmt))
    noise = np.random.default_rng(seed).integers(0, 256, p.shape, dtype=np.uint8)
    unread = np.ones(p.shape[0], bool)
    unread[list(idx)] = False
    scrambled = np.where(unread[:, None, None], noise, p)
    np.testing.assert_array_equal(
        sefp.derive_codes(unpack_bitplanes_for(scrambled, fmt, b), b, fmt), sefp.derive_codes(m, b, fmt)
    )


@pytest.mark.parametrize("rounding, extra", [("halfup", 1), ("midpoint", 1), ("nearest", 8)])
def test_b_planes_alone_are_not_enough_where_the_table_says_so(rounding, extra):
    # planes_read is not overstated: with only the first b planes (nearest: with any fewer than
    # all 8, since a tie is "the dropped bits are exactly 10...0") these roundings go wrong.
    fmt = SEFPFormat(rounding=rounding)
    m = np.array([[1, -1, 3, 0, 12, -13, 48, 64, 66, 65, 97, 96, 33, 32, 80, 81, 17, 9, 5, 2, 7, 11, 25, 40]], np.int8)
    p = pack_bitplanes(m)
    for b in range(2, 8):
        assert fmt.planes_read(b) == min(b + extra, 8)
        assert (sefp.derive_codes(unpack_bitplanes(p, fmt.planes_read(b) - 1), b, fmt)
                != sefp.derive_codes(m, b, fmt)).any()


def test_pack_sefp_bitplanes_and_bytes_read():
    w = np.random.default_rng(0).standard_normal((24, 200)).astype(np.float32)
    for fmt in SEFP_ROWS:
        t = sefp.encode(w, fmt)
        p = pack_sefp_bitplanes(t)
        assert p.shape == (8 + needs_nonzero_plane(fmt), 24, t.mantissa.shape[1] // 8)
        for b in ALL_BITS:
            np.testing.assert_array_equal(
                sefp.derive_codes(unpack_bitplanes_for(p, fmt, b), b, fmt), sefp.derive_codes(t.mantissa, b, fmt)
            )
    fmt = FORMATS["sefp-g64-trunc"]
    # 4 planes of 4096/8 bytes per row + one int8 exponent per 64 weights
    assert bitplane_bytes_read(fmt, 4, 4096, 4096) == 4 * 4096 * 512 + 4096 * 64
    for b in ALL_BITS:  # trunc reads exactly bits_per_weight
        assert bitplane_bytes_read(fmt, b, 128, 4096) * 8 == fmt.bits_per_weight(b) * 128 * 4096
    assert bitplane_bytes_read(FORMATS["sefp-g64-halfup"], 4, 1, 64) == 5 * 8 + 1
    assert bitplane_bytes_read(FORMATS["sefp-g64-nearest"], 4, 1, 64) == 8 * 8 + 1
    assert bitplane_bytes_read(FORMATS["ssfp-g64-trunc"], 4, 1, 64) == 4 * 8 + 2
    assert bitplane_bytes_read(FORMATS["sefp-g64-midpoint"], 8, 1, 64) == 8 * 8 + 1
    assert bitplane_bytes_read(fmt, 2, 1, 65) == 2 * 16 + 2  # ragged: padded to two groups


def test_bitplane_errors():
    with pytest.raises(FormatError, match="int8"):
        pack_bitplanes(np.zeros((2, 8), np.int16))
    with pytest.raises(FormatError, match="multiple of 8"):
        pack_bitplanes(np.zeros((2, 12), np.int8))
    with pytest.raises(FormatError, match="-128"):
        pack_bitplanes(np.full((1, 8), -128, np.int8))
    p = pack_bitplanes(np.zeros((1, 8), np.int8))
    with pytest.raises(FormatError, match="planes"):
        unpack_bitplanes(p, 9)
    with pytest.raises(FormatError, match="nonzero_plane=True"):
        unpack_bitplanes_for(p, FORMATS["sefp-g64-midpoint"], 4)


# --------------------------------------------------------------------------- MatMulNBits


@st.composite
def code_blocks(draw, signed: bool):
    c = draw(st.sampled_from(CONTAINERS))
    block = draw(st.sampled_from(GROUP_SIZES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    N, blocks = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    lo, hi = (-(2 ** (c - 1)), 2 ** (c - 1)) if signed else (0, 2**c)
    return c, block, rng.integers(lo, hi, (N, blocks * block)).astype(np.int16)


@FAST
@given(code_blocks(signed=True))
def test_matmulnbits_signed_round_trip(case):
    c, block, q = case
    B = pack_matmulnbits(q, c, block)
    N, K = q.shape
    assert B.dtype == np.uint8 and B.shape == (N, K // block, block * c // 8)
    np.testing.assert_array_equal(unpack_matmulnbits(B, c, K), q)
    np.testing.assert_array_equal(unpack_matmulnbits(B, c, K - 3), q[:, : K - 3])
    np.testing.assert_array_equal(unpack_matmulnbits_unsigned(B, c), q + 2 ** (c - 1))


@FAST
@given(code_blocks(signed=False), st.integers(0, 2**32 - 1))
def test_matmulnbits_unsigned_and_zero_points_round_trip(case, seed):
    c, block, q = case
    B = pack_matmulnbits_unsigned(q, c, block)
    np.testing.assert_array_equal(unpack_matmulnbits_unsigned(B, c, q.shape[1]), q)
    N, blocks = q.shape[0], q.shape[1] // block
    z = np.random.default_rng(seed).integers(0, 2**c, (N, blocks))
    zp = pack_zero_points(z, c)
    assert zp.dtype == np.uint8 and zp.shape == (N * -(-blocks * c // 8),)
    np.testing.assert_array_equal(unpack_zero_points(zp, c, N, blocks), z)


def test_matmulnbits_byte_layout_low_bits_first():
    q = np.tile(np.array([0, 1, 2, 3], np.int16), (1, 4))  # one 16-wide block
    assert pack_matmulnbits_unsigned(q, 2, 16)[0, 0].tolist() == [0b11100100] * 4
    q4 = np.tile(np.array([1, 2], np.int16), (1, 8))
    assert pack_matmulnbits_unsigned(q4, 4, 16)[0, 0].tolist() == [0x21] * 8
    assert pack_matmulnbits(q4 - 8, 4, 16)[0, 0].tolist() == [0x21] * 8  # signed: +2^(c-1)
    # 3 blocks of 4-bit zero points: each row padded to 2 bytes, rows not run together
    zp = pack_zero_points(np.array([[1, 2, 3], [4, 5, 6]]), 4)
    assert zp.tolist() == [0x21, 0x03, 0x54, 0x06]


def test_matmulnbits_errors():
    q = np.zeros((2, 32), np.int16)
    with pytest.raises(FormatError, match="container"):
        pack_matmulnbits(q, 3, 32)
    with pytest.raises(FormatError, match="power of two >= 16"):
        pack_matmulnbits(q, 4, 8)
    with pytest.raises(FormatError, match="multiple of 64"):
        pack_matmulnbits(q, 4, 64)
    with pytest.raises(FormatError, match="do not fit a 2-bit"):
        pack_matmulnbits(q + 2, 2, 32)
    with pytest.raises(FormatError, match="unsigned 4-bit"):
        pack_matmulnbits_unsigned(q - 1, 4, 32)
    with pytest.raises(FormatError, match="fit 2 bits"):
        pack_zero_points(np.full((2, 1), 4), 2)
    t = sefp.encode(np.ones((2, 64), np.float32), FORMATS["sefp-g64-midpoint"])
    with pytest.raises(FormatError, match=r"sefp-g64-midpoint at 8 bits needs a 9-bit"):
        sefp_to_matmulnbits(t, 8)


@pytest.mark.parametrize("fmt", SEFP_ROWS, ids=lambda f: f.name)
def test_sefp_to_matmulnbits_reproduces_decode(fmt):
    w = np.random.default_rng(1).standard_normal((6, 3 * fmt.group_size - 5)).astype(np.float32)
    w[0, : fmt.group_size] = 0  # a zero group
    t = sefp.encode(w, fmt)
    for b in ALL_BITS:
        if fmt.container_bits(b) is None:
            continue
        B, scales, c = sefp_to_matmulnbits(t, b)
        assert c == fmt.container_bits(b) and scales.dtype == np.float32
        assert scales.shape == t.shared.shape
        q = unpack_matmulnbits(B, c, w.shape[1]).astype(np.float32)
        deq = q.reshape(6, -1) * np.repeat(scales, fmt.group_size, axis=1)[:, : w.shape[1]]
        np.testing.assert_array_equal(deq, sefp.decode(t, b))  # power-of-two or fp16 scales: exact


# --------------------------------------------------------------------------- onnxruntime

def _matmulnbits_session(B, scales, zero_points, K, N, bits, block):
    ort = pytest.importorskip("onnxruntime")  # here, not at module level: skip only these tests
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft",
        K=K, N=N, bits=bits, block_size=block, accuracy_level=0,  # 0: fp32 math, no int8 activations
    )
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    # onnx 1.23 writes IR 14 by default; IR 10 / opset 21 is what ORT >= 1.20 reads (docs/FACTS.md).
    model = helper.make_model(
        graph, ir_version=10,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _check_against_numpy(sess, A, W, W_terms):
    """ORT's fp32 result vs float64 A @ W.T. ORT dequantizes exactly (power-of-two or fp16
    scales times small integers fit fp32), then sums K fp32 products; recursive/blocked fp32
    summation errs by at most ~K·u·Σ|a·w| (u = 2^-24). We allow K·2^-22·Σ|a|·|terms| (2x
    margin for FMA/blocking order) where |terms| bounds every operand ORT may form on the
    way, e.g. q·s and zp·s separately for asymmetric ints."""
    y = sess.run(None, {"A": A})[0]
    ref = A.astype(np.float64) @ W.astype(np.float64).T
    K = A.shape[1]
    tol = K * 2.0**-22 * (np.abs(A).astype(np.float64) @ W_terms.astype(np.float64).T) + 1e-30
    assert y.shape == ref.shape
    assert (np.abs(y - ref) <= tol).all(), float((np.abs(y - ref) / tol).max())


def _sefp_cases():
    for fmt in SEFP_ROWS:
        if fmt.group_size not in (16, 64, 256) and fmt.rounding != "trunc":
            continue  # every group size for trunc; the others at three sizes keep this fast
        for b in ALL_BITS:
            if fmt.container_bits(b) is not None:
                yield pytest.param(fmt, b, id=f"{fmt.name}-b{b}")


@pytest.mark.parametrize("fmt, bits", list(_sefp_cases()))
def test_onnxruntime_matmulnbits_sefp(fmt, bits):
    rng = np.random.default_rng(bits * 1000 + fmt.group_size)
    N, K = 12, 3 * fmt.group_size - 7  # ragged K: an odd block count and a padded last block
    w = rng.standard_normal((N, K)).astype(np.float32) * np.exp2(rng.integers(-4, 4, (N, 1))).astype(np.float32)
    w[1] = 0  # all-zero groups: sentinel exponent, subnormal scale, zero codes
    t = sefp.encode(w, fmt)
    B, scales, c = sefp_to_matmulnbits(t, bits)
    assert c == fmt.container_bits(bits) and c in (2, 4, 8)
    sess = _matmulnbits_session(B, scales, None, K, N, c, fmt.group_size)
    A = rng.standard_normal((3, K)).astype(np.float32)
    W = sefp.decode(t, bits)
    _check_against_numpy(sess, A, W, np.abs(W))


@pytest.mark.parametrize("fmt", [f for f in INT_ROWS if f.group_size in (16, 128)], ids=lambda f: f.name)
def test_onnxruntime_matmulnbits_int(fmt):
    rng = np.random.default_rng(fmt.bits * 7 + fmt.group_size)
    N, K = 10, 3 * fmt.group_size - 9
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[2] = np.abs(w[2])  # zero point at qmin
    t = intq.encode(w, fmt)
    B, scales, zp = int_to_matmulnbits(t)
    assert (zp is None) == fmt.symmetric
    c = fmt.container_bits()
    sess = _matmulnbits_session(B, scales, zp, K, N, c, fmt.group_size)
    A = rng.standard_normal((4, K)).astype(np.float32)
    W = intq.decode(t)
    G = fmt.group_size
    s = np.repeat(t.scale, G, axis=1)[:, :K]
    zero = t.zero if not fmt.symmetric else np.full_like(t.zero, 2 ** (c - 1))
    codes = t.codes[:, :K] + (0 if not fmt.symmetric else 2 ** (c - 1))
    terms = (np.abs(codes) + np.repeat(zero, G, axis=1)[:, :K]) * s
    _check_against_numpy(sess, A, W, terms)


@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7])
def test_onnxruntime_rejects_other_containers(bits):
    """Why CONTAINERS is (2, 4, 8): ORT's CPU MatMulNBits refuses the rest at session creation."""
    block, K, N = 16, 16, 2
    B = np.zeros((N, 1, block * bits // 8), np.uint8)  # a well-formed B: only `bits` is wrong
    with pytest.raises(Exception, match="(?i)bits|support"):
        _matmulnbits_session(B, np.ones((N, 1), np.float32), None, K, N, bits, block)
