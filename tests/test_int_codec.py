"""Integer RTN codec (GPTQ/AWQ/RTN baselines): numpy and torch twins, ranges, error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaro.errors import FormatError
from otaro.formats import FORMATS, IntFormat
from otaro.formats import intq
from otaro.formats import torch_ref as T

INT_ROWS = [f for f in FORMATS.values() if isinstance(f, IntFormat)]
FAST = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
KINDS = ["gauss", "heavy", "sparse", "positive", "negative", "constant"]


def make_weight(seed: int, out: int, inp: int, log2_scale: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inp))
    if kind == "heavy":
        w = w**3
    elif kind == "sparse":
        w = w * (rng.random((out, inp)) < 0.3)
        w[:, : inp // 2] = 0.0
    elif kind == "positive":  # asym groups whose range is [0, max]: zero point at qmin
        w = np.abs(w)
    elif kind == "negative":
        w = -np.abs(w)
    elif kind == "constant":
        w = np.full((out, inp), rng.standard_normal())
    return np.ldexp(w.astype(np.float32), log2_scale)


@st.composite
def int_weights(draw):
    fmt = draw(st.sampled_from(INT_ROWS))
    G = fmt.group_size
    out = draw(st.integers(1, 4))
    inp = draw(st.integers(1, 3 * G))
    kind = draw(st.sampled_from(KINDS))
    # fp16 scales: keep |w| well inside fp16's range, plus a few groups tiny enough to underflow.
    log2_scale = draw(st.one_of(st.integers(-8, 8), st.just(-40)))
    return fmt, make_weight(draw(st.integers(0, 2**32 - 1)), out, inp, log2_scale, kind)


def _expand(x: np.ndarray, G: int, inp: int) -> np.ndarray:
    return np.repeat(x, G, axis=1)[:, :inp]


@FAST
@given(int_weights())
def test_numpy_and_torch_are_bit_exact(case):
    fmt, w = case
    t = intq.encode(w, fmt)
    codes, scale, zero = T.int_encode(torch.from_numpy(w), fmt)
    np.testing.assert_array_equal(t.codes, codes.numpy())
    np.testing.assert_array_equal(t.scale.view(np.int32), scale.numpy().view(np.int32))
    np.testing.assert_array_equal(t.zero, zero.numpy())
    ref = intq.decode(t)
    got = T.int_dequantize(codes, scale, zero, fmt, w.shape[1]).numpy()
    assert ref.shape == got.shape == w.shape
    np.testing.assert_array_equal(ref.view(np.int32), got.view(np.int32))


@FAST
@given(int_weights())
def test_codes_in_range_scales_fp16_and_zero_exact(case):
    fmt, w = case
    t = intq.encode(w, fmt)
    G = fmt.group_size
    groups = -(-w.shape[1] // G)
    assert t.codes.shape == (w.shape[0], groups * G) and t.scale.shape == t.zero.shape == (w.shape[0], groups)
    assert t.codes.min() >= fmt.qmin and t.codes.max() <= fmt.qmax
    assert (t.scale > 0).all() and np.isfinite(t.scale).all()
    np.testing.assert_array_equal(t.scale.astype(np.float16).astype(np.float32), t.scale)  # deployable as fp16
    if fmt.symmetric:
        assert (t.zero == 0).all()
    else:
        assert t.zero.min() >= 0 and t.zero.max() <= fmt.qmax
    q = intq.decode(t)
    assert (q[w == 0] == 0).all()  # zero is always exactly representable


@FAST
@given(int_weights())
def test_error_at_most_half_a_scale_inside_the_range(case):
    fmt, w = case
    t = intq.encode(w, fmt)
    G, inp = fmt.group_size, w.shape[1]
    s = _expand(t.scale, G, inp).astype(np.float64)
    z = _expand(t.zero, G, inp)
    unclipped = np.rint(w.astype(np.float64) / s) + z
    inside = (unclipped >= fmt.qmin) & (unclipped <= fmt.qmax)
    err = np.abs(w.astype(np.float64) - intq.decode(t))
    # The codec divides in fp32: the quotient (|w/s| <= 2^8) carries up to 2^-16 of absolute
    # rounding, so a value a hair past a half step may round the other way.
    assert (err[inside] <= s[inside] * (0.5 + 2.0**-15)).all()
    # Clipping only comes from rounding the scale to fp16: by at most 2^-11 relative, or half
    # an fp16 subnormal ulp (2^-25) absolute, times at most 2^bits codes of range. Outside the
    # range the error stays within half a step plus that slack.
    amax = _expand(np.abs(intq.pad_groups(w, G)).reshape(w.shape[0], -1, G).max(-1), G, inp)
    slack = amax * 2.0**-9 + 2.0 ** (fmt.bits - 25)
    assert (err <= s * (0.5 + 2.0**-15) + slack).all()


@pytest.mark.parametrize("fmt", [f for f in INT_ROWS if f.group_size == 32], ids=lambda f: f.name)
def test_all_zero_groups(fmt):
    w = np.zeros((2, 3 * 32 - 7), np.float32)
    w[1, 40:50] = np.linspace(-1, 2, 10)  # one live group among zero ones
    t = intq.encode(w, fmt)
    dead = np.ones(t.scale.shape, bool)
    dead[1, 1] = False
    assert (t.scale[dead] == 1.0).all()
    codes = t.codes.reshape(2, -1, 32)
    assert (codes[dead] == t.zero[dead][:, None]).all()  # every code is the zero point
    q = intq.decode(t)
    assert q.shape == w.shape
    assert (q[:, :32] == 0).all() and (q[0] == 0).all() and (q[1, 64:] == 0).all()
    codes_t, scale_t, zero_t = T.int_encode(torch.from_numpy(w), fmt)
    np.testing.assert_array_equal(codes_t.numpy(), t.codes)
    np.testing.assert_array_equal(scale_t.numpy(), t.scale)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_raise_naming_the_tensor(bad):
    fmt = FORMATS["int4-g128-asym"]
    w = np.ones((2, 130), np.float32)
    w[0, 129] = bad
    with pytest.raises(FormatError, match=r"model\.layers\.3\.self_attn\.o_proj.*non-finite"):
        intq.encode(w, fmt, name="model.layers.3.self_attn.o_proj")
    with pytest.raises(FormatError, match=r"o_proj.*non-finite"):
        T.int_encode(torch.from_numpy(w), fmt, name="o_proj")


def test_symmetric_grid_is_centered():
    fmt = FORMATS["int4-g32-sym"]
    w = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    t = intq.encode(w, fmt)
    assert t.codes.min() == -7 and t.codes.max() == 7
    assert math.isclose(float(t.scale[0, 0]), float(np.float16(1 / 7)), rel_tol=0)
