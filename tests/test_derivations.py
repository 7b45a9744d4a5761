"""The derivations of the format table (format v2): one definition per rounding, read by numpy,
torch and the ONNX builder alike; and the statistical properties the quality issue asks for.

"Single rounding" below is the reference a derivation is judged against: quantizing the float
weight directly to the b-bit grid of the same group scale (round to nearest, saturating; for
midpoint its own grid of cell middles). Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from otaro.formats import ALL_BITS, SEFPFormat, sefp
from otaro.formats import onnx_ops as ops
from otaro.formats import table
from otaro.formats import torch_ref as T


def _weights():
    rng = np.random.default_rng(2026)
    return {
        "gauss": rng.standard_normal((256, 4096)).astype(np.float32),
        "student-t4": rng.standard_t(4, (256, 4096)).astype(np.float32),
    }


WEIGHTS = _weights()


def single_rounding(w: np.ndarray, t: sefp.SEFPTensor, b: int) -> np.ndarray:
    """The float weight rounded once, directly at b, with the group scale t chose."""
    fmt, G = t.fmt, t.fmt.group_size
    d8 = sefp.step_scale(t.shared, 8, dataclasses.replace(fmt, rounding="nearest")).astype(np.float64)
    d8 = np.repeat(d8, G, 1)[:, : w.shape[1]]
    db = d8 * 2.0 ** (8 - b)
    a = np.abs(w.astype(np.float64))
    lim = 2 ** (b - 1) - 1
    if fmt.rounding == "midpoint":
        q = np.where(a < d8, 0.0, (np.minimum(np.floor(a / db), lim) + 0.5) * db)
    else:
        q = np.minimum(np.rint(a / db), lim) * db
    return np.sign(w) * q


def rmse_and_gain(w, q):
    w, q = w.astype(np.float64), q.astype(np.float64)
    return np.sqrt(((w - q) ** 2).mean()), (w * q).sum() / (q * q).sum()


# Information-theoretic bound for a rounded 8-bit code: at b = 5..7 a fraction 2^-(8-b) of the
# stored codes sit exactly on a b-bit decision boundary (M8 = (k + 1/2)·2^(8-b)) and the weight
# behind them lies on either side with equal odds, so *any* derivation from M8 alone loses there.
# Measured on these weights: 1.023 / 1.09 / 1.33 (pow2), 1.020 / 1.08 / 1.31 (fp16). The bound
# elsewhere is the 1.02. Multi-bit code selection (otaro.methods.multibit) is the fix for
# b = 5..7, at a small cost at b = 8.
NEAREST_RMSE_LIMIT = {2: 1.02, 3: 1.02, 4: 1.02, 5: 1.03, 6: 1.10, 7: 1.34, 8: 1.0 + 1e-9}


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
@pytest.mark.parametrize("scale", ["pow2", "fp16"])
def test_nearest_is_unbiased_and_close_to_a_single_rounding(kind, scale):
    w = WEIGHTS[kind]
    fmt = SEFPFormat(group_size=64, rounding="nearest", scale=scale)
    t = sefp.encode(w, fmt)
    for b in ALL_BITS:
        r, g = rmse_and_gain(w, sefp.decode(t, b))
        r0, g0 = rmse_and_gain(w, single_rounding(w, t, b))
        assert r / r0 <= NEAREST_RMSE_LIMIT[b], (b, r / r0)
        # Least-squares gain relative to a single rounding (which itself shrinks at b <= 4: the
        # dead zone around 0 and saturation; 0.78 at b = 2 on Gaussian groups). Ties to even
        # balance up and down when there are many tie levels; with few they do not quite: at
        # b = 2 the only tie in range (M8 = 32) goes to 0. Measured (Gaussian / Student-t):
        # b2 1.008 / 1.011, b3 1.0006 / 1.0075, b4 0.9999 / 1.0022, b >= 5 within 0.0004.
        tol = {2: 0.015, 3: 0.008, 4: 0.003}.get(b, 0.002)
        assert abs(g / g0 - 1) <= tol, (b, g / g0)


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
@pytest.mark.parametrize("scale", ["pow2", "fp16"])
def test_midpoint_is_exactly_a_single_rounding(kind, scale):
    w = WEIGHTS[kind]
    t = sefp.encode(w, SEFPFormat(group_size=64, rounding="midpoint", scale=scale))
    for b in ALL_BITS:
        np.testing.assert_allclose(sefp.decode(t, b), single_rounding(w, t, b), rtol=0, atol=0)


@pytest.mark.parametrize("rounding", ["trunc", "nearest"])
def test_rounded_8bit_code_is_unbiased(rounding):
    """Format v2 rounds the stored code to nearest for trunc as well (v1 truncated it: gain
    0.989 at b = 8): at b = 8 every rint row is one unbiased rounding."""
    for w in WEIGHTS.values():
        t = sefp.encode(w, SEFPFormat(group_size=64, rounding=rounding))
        r, g = rmse_and_gain(w, sefp.decode(t, 8))
        r0, g0 = rmse_and_gain(w, single_rounding(w, t, 8))
        assert r == r0 and abs(g - 1) <= 0.002


def test_v1_nearest_was_biased_and_stays_decodable():
    """halfup is format v1's nearest: inflating (gain < 1 by ~1.2% at b = 4..7), kept only to
    decode old files; the v2 derivation removes the bias at the same error."""
    w = WEIGHTS["gauss"]
    old = sefp.encode(w, SEFPFormat(group_size=64, rounding="halfup"))
    new = sefp.encode(w, SEFPFormat(group_size=64, rounding="nearest"))
    np.testing.assert_array_equal(old.mantissa, new.mantissa)  # same stored code
    for b in (4, 5, 6, 7):
        _, g0 = rmse_and_gain(w, single_rounding(w, new, b))
        _, g_old = rmse_and_gain(w, sefp.decode(old, b))
        _, g_new = rmse_and_gain(w, sefp.decode(new, b))
        assert g_old / g0 < 0.99 < 0.998 < g_new / g0
    assert table.SEFP_ROUNDINGS["halfup"].legacy and "sefp-g64-halfup" not in table.quantized_format_names()


# --------------------------------------------------------------------------- one definition


def _onnx_codes(fmt: SEFPFormat, mantissa: np.ndarray, bits: int) -> np.ndarray:
    """Derived codes computed by onnxruntime from the ONNX nodes the builder emits."""
    nodes = [helper.make_node("Cast", ["M"], ["m32"], to=TensorProto.INT32),
             helper.make_node("Constant", [], ["p"], value=numpy_helper.from_array(np.array(2 ** (8 - bits), np.int32)))]
    nodes += ops._decode_nodes(fmt)
    nodes.append(helper.make_node("Cast", ["codes"], ["Y"], to=TensorProto.INT32))
    g = helper.make_graph(nodes, "d", [helper.make_tensor_value_info("M", TensorProto.INT8, list(mantissa.shape))],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ops.OPSET)], ir_version=ops.IR_VERSION)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"M": mantissa})[0]


ALL_CODES = np.arange(-127, 128, dtype=np.int8).reshape(1, -1)


@pytest.mark.parametrize("rounding", sorted(table.SEFP_ROUNDINGS))
def test_every_backend_reads_the_same_derivation(rounding):
    fmt = SEFPFormat(group_size=16, rounding=rounding)
    for b in ALL_BITS:
        ref = sefp.derive_codes(ALL_CODES, b, fmt)
        np.testing.assert_array_equal(T.sefp_derive_codes(torch.from_numpy(ALL_CODES), b, fmt).numpy(), ref)
        np.testing.assert_array_equal(_onnx_codes(fmt, ALL_CODES, b), ref)


def test_a_new_row_needs_only_its_derivation(monkeypatch):
    """Adding a rounding is one table row: numpy, torch and ONNX pick up its formula with no
    code of their own (no if/elif on rounding names anywhere)."""

    def derive_half_down(o, M, p, lim):  # round half toward zero: floor((2M + p - 1) / 2p)
        return o.minimum(o.floordiv(o.add(o.mul(M, o.c(2)), o.add(p, o.c(-1))), o.mul(p, o.c(2))), lim)

    row = table.SEFPRounding("halfdown", "test row", extra_planes=8, extra_code_bits=0, exact_nesting=False,
                             encoder="rint", derive=derive_half_down)
    monkeypatch.setitem(table.SEFP_ROUNDINGS, "halfdown", row)
    fmt = SEFPFormat(group_size=16, rounding="halfdown")
    for b in ALL_BITS:
        p = 2 ** (8 - b)
        M = np.abs(ALL_CODES.astype(np.int64))
        expect = np.sign(ALL_CODES) * np.minimum(np.ceil(M / p - 0.5), 2 ** (b - 1) - 1)
        np.testing.assert_array_equal(sefp.derive_codes(ALL_CODES, b, fmt), expect)
        np.testing.assert_array_equal(T.sefp_derive_codes(torch.from_numpy(ALL_CODES), b, fmt).numpy(), expect)
        np.testing.assert_array_equal(_onnx_codes(fmt, ALL_CODES, b), expect)
