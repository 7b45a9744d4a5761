"""otaro.kernels fused SEFP encoder / fake-quant against torch_ref, bit for bit (torch.equal).

Runs on CPU through Triton's interpreter; the same tests run on a GPU when one is present.
"""

import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Before triton is imported anywhere in this process (see tests/test_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import torch  # noqa: E402

from otaro.errors import FormatError, OtaroError  # noqa: E402
from otaro.formats import torch_ref  # noqa: E402
from otaro.formats.table import ALL_BITS, SEFP_ROUNDINGS, IntFormat, SEFPFormat  # noqa: E402
from otaro.kernels import fakequant, quant_op  # noqa: E402
from otaro.kernels.quant_op import SEFPFakeQuant, encode, fake_quant  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton can run neither on a GPU nor in its interpreter here", allow_module_level=True)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

ROUNDINGS = [r for r, spec in SEFP_ROUNDINGS.items() if not spec.legacy]
SCALES = ["pow2", "fp16"]


def _weights(K: int, G: int, scale: str, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """[10, K] weights (K ragged against G) holding every case the encoder treats specially."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, K, generator=g) * 0.05
    w[0, :G] = 0.0  # an all-zero group
    w[0, G:] *= -1
    # A group whose max is below 2^-126 (flushed to zero in pow2 rows, and below fp16 scales).
    w[1, :G] = torch.randn(G, generator=g) * 2.0**-130
    w[2, 3] = 40.0 if scale == "pow2" else 7.0  # an outlier dominating its group
    w[3, :] = -0.0  # negative zero everywhere in a row
    w[3, K - 1] = 0.25
    # Exact ties of |w| / Δ8 (rint must go to even) and of the derivations: max 1.0 gives E = 0,
    # Δ8 = 2^-6 for pow2 rows; multiples of 1/128 are half-integer codes.
    w[4, :G] = torch.arange(G, dtype=torch.float32) / 128.0 - G / 256.0
    w[4, 0] = 1.0
    # Near the bottom of the exponent range: E = -126 with subnormal members, and E = -122
    # (where a single 2^(6-E) overflows fp32).
    w[5, :G] = torch.randn(G, generator=g) * 2.0**-125
    w[5, G - 1] = 2.0**-126
    w[6, :G] = torch.randn(G, generator=g) * 2.0**-121
    if scale == "pow2" and dtype != torch.float16:  # beyond fp16's range
        w[7, :G] = torch.randn(G, generator=g) * 2.0**120  # the top of the exponent range
    # ssfp ties: multiples of half the scale (scale fp16(1.27 / 127) = 0.01 rounded).
    w[8, :G] = torch.linspace(-1.27, 1.27, G)
    return w.to(dtype).to(DEVICE)


def _fmt(G, rounding, scale):
    return SEFPFormat(group_size=G, rounding=rounding, scale=scale)


# ---------------------------------------------------------------- bit-exact against torch_ref


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("G,K", [(16, 72), (32, 96), (64, 150)])
def test_encode_and_fake_quant_match_reference(scale, rounding, G, K):
    fmt = _fmt(G, rounding, scale)
    w = _weights(K, G, scale)
    m8, shared = fakequant.sefp_encode_triton(w, fmt)
    want_m8, want_shared = torch_ref.sefp_encode(w, fmt)
    assert torch.equal(m8, want_m8) and torch.equal(shared, want_shared)
    for bits in ALL_BITS:
        q = fakequant.sefp_fake_quant_triton(w, fmt, bits)
        want = torch_ref.sefp_quantize(w, fmt, bits)
        assert q.dtype == w.dtype and q.shape == w.shape
        assert torch.equal(q, want), (fmt.name, bits, (q != want).nonzero()[:5].tolist())
        # Negative zero of the input comes out as +0, as in the reference (codes have no -0).
        assert torch.equal(torch.signbit(q), torch.signbit(want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", SCALES)
def test_half_precision_weights_match_reference(dtype, scale):
    for rounding in ROUNDINGS:
        fmt = _fmt(32, rounding, scale)
        w = _weights(80, 32, scale, seed=1, dtype=dtype)
        m8, shared = fakequant.sefp_encode_triton(w, fmt)
        want_m8, want_shared = torch_ref.sefp_encode(w, fmt)
        assert torch.equal(m8, want_m8) and torch.equal(shared, want_shared)
        for bits in ALL_BITS:
            q = fakequant.sefp_fake_quant_triton(w, fmt, bits)
            assert q.dtype == dtype
            assert torch.equal(q, torch_ref.sefp_quantize(w, fmt, bits)), (fmt.name, dtype, bits)


def test_wide_groups_strided_input_and_legacy_rounding():
    # G = 128 / 256, a transposed (non-contiguous) weight, and the legacy halfup row (old files).
    for fmt in (_fmt(128, "nearest", "pow2"), _fmt(256, "midpoint", "fp16"), _fmt(64, "halfup", "pow2")):
        w = _weights(300, fmt.group_size, fmt.scale, seed=2).t().contiguous().t()  # stride (1, 10)
        assert not w.is_contiguous()
        assert torch.equal(fakequant.sefp_encode_triton(w, fmt)[0], torch_ref.sefp_encode(w, fmt)[0])
        for bits in (2, 5, 8):
            assert torch.equal(fakequant.sefp_fake_quant_triton(w, fmt, bits), torch_ref.sefp_quantize(w, fmt, bits))


def test_every_stored_code_survives_the_fused_path():
    # One group per row holding each |code| 0..127 once (max 127·Δ8 with Δ8 = 2^-6): the fused
    # derivation must agree with the reference on every stored magnitude, not just sampled ones.
    codes = torch.arange(128, dtype=torch.float32)
    w = torch.stack([codes, -codes]).reshape(2, 128) / 64.0
    w = w.to(DEVICE)
    for rounding in ROUNDINGS:
        fmt = _fmt(128, rounding, "pow2")
        for bits in ALL_BITS:
            assert torch.equal(fakequant.sefp_fake_quant_triton(w, fmt, bits), torch_ref.sefp_quantize(w, fmt, bits))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SCALES), st.sampled_from(ROUNDINGS), st.sampled_from([16, 32, 64]),
       st.integers(1, 5), st.integers(1, 130), st.integers(-140, 60), st.integers(0, 2**31 - 1))
def test_random_shapes_and_magnitudes_match_reference(scale, rounding, G, N, K, log2_mag, seed):
    fmt = _fmt(G, rounding, scale)
    if scale == "fp16":
        log2_mag = min(log2_mag, 12)  # beyond that the fp16 scales overflow (tested separately)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 2.0**log2_mag).to(DEVICE)
    want_m8, want_shared = torch_ref.sefp_encode(w, fmt)
    m8, shared = fakequant.sefp_encode_triton(w, fmt)
    assert torch.equal(m8, want_m8) and torch.equal(shared, want_shared)
    bits = ALL_BITS[seed % len(ALL_BITS)]
    assert torch.equal(fakequant.sefp_fake_quant_triton(w, fmt, bits), torch_ref.sefp_quantize(w, fmt, bits))


# ---------------------------------------------------------------- the wrapper and its errors


def test_wrapper_uses_triton_and_matches(monkeypatch):
    fmt = _fmt(32, "nearest", "pow2")
    w = _weights(70, 32, "pow2")
    assert quant_op.triton_reason(w, fmt) is None
    calls = []
    real = fakequant.sefp_fake_quant_triton
    monkeypatch.setattr(fakequant, "sefp_fake_quant_triton", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(fake_quant(w, fmt, 3), torch_ref.sefp_quantize(w, fmt, 3)) and calls
    m8, shared = encode(w, fmt)
    assert torch.equal(m8, torch_ref.sefp_encode(w, fmt)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_like_the_reference(bad):
    fmt = _fmt(16, "trunc", "pow2")
    w = _weights(40, 16, "pow2")
    w[2, 7] = bad
    with pytest.raises(FormatError) as want:
        torch_ref.sefp_quantize(w, fmt, 4)
    paths = (lambda: fake_quant(w, fmt, 4), lambda: encode(w, fmt), lambda: fake_quant(w, fmt, 4, prefer="reference"))
    for fn in paths:
        with pytest.raises(FormatError) as got:
            fn()
        assert str(got.value) == str(want.value)


def test_fp16_scale_overflow_raises_like_the_reference():
    fmt = _fmt(16, "nearest", "fp16")
    w = torch.ones(2, 16, device=DEVICE)
    w[1, 3] = 1e7  # 1e7 / 127 > fp16 max
    with pytest.raises(FormatError) as want:
        torch_ref.sefp_quantize(w, fmt, 4, check=False)
    with pytest.raises(FormatError) as got:
        fake_quant(w, fmt, 4, check=False)
    assert str(got.value) == str(want.value)


def test_bad_input_is_a_format_error():
    fmt = _fmt(16, "trunc", "pow2")
    w = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(FormatError, match="bit-width"):
        fake_quant(w, fmt, 9)
    with pytest.raises(FormatError, match="2-D"):
        fake_quant(w[0], fmt, 4)
    with pytest.raises(FormatError, match="SEFP format"):
        fake_quant(w, IntFormat(bits=4, group_size=16), 4)
    with pytest.raises(FormatError, match="float32, float16 or bfloat16"):
        fakequant.sefp_fake_quant_triton(w.to(torch.float64), fmt, 4)
    with pytest.raises(OtaroError, match="prefer"):
        fake_quant(w, fmt, 4, prefer="cuda")


def test_empty_weight():
    fmt = _fmt(16, "trunc", "pow2")
    assert fakequant.sefp_fake_quant_triton(torch.zeros(0, 20, device=DEVICE), fmt, 4).shape == (0, 20)


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("scale", SCALES)
def test_straight_through_gradient_is_the_identity(scale):
    from otaro.modules import SEFPLinear

    fmt = _fmt(32, "midpoint", scale)
    w = _weights(50, 32, scale).requires_grad_(True)
    q = SEFPFakeQuant.apply(w, fmt, 3)
    assert torch.equal(q.detach(), torch_ref.sefp_quantize(w.detach(), fmt, 3))
    upstream = torch.randn_like(q)
    (grad,) = torch.autograd.grad(q, w, upstream)
    assert torch.equal(grad, upstream)
    # The same forward as the master-form SEFPLinear (torch_ref + _StraightThrough).
    lin = torch.nn.Linear(50, 10, bias=False).to(DEVICE)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SEFPLinear.from_linear(lin, fmt, packed=False)
    assert torch.equal(layer.quantized_weight(3), q)


# ---------------------------------------------------------------- fallback


def test_fallback_when_the_interpreter_is_off(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("the CPU fallback is only reachable with CPU tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fmt = _fmt(16, "nearest", "fp16")
    w = _weights(40, 16, "fp16")
    assert "TRITON_INTERPRET" in quant_op.triton_reason(w, fmt)
    monkeypatch.setattr(fakequant, "sefp_fake_quant_triton", lambda *a: pytest.fail("Triton ran"))
    assert torch.equal(fake_quant(w, fmt, 5), torch_ref.sefp_quantize(w, fmt, 5))


def test_kernel_failure_warns_and_falls_back_unless_strict(monkeypatch):
    def broken(*a):
        raise RuntimeError("no toolchain")

    monkeypatch.setattr(fakequant, "sefp_fake_quant_triton", broken)
    fmt = _fmt(16, "trunc", "pow2")
    w = _weights(40, 16, "pow2")
    with pytest.warns(RuntimeWarning, match="no toolchain"):
        assert torch.equal(fake_quant(w, fmt, 4), torch_ref.sefp_quantize(w, fmt, 4))
    with pytest.raises(RuntimeError, match="no toolchain"):
        fake_quant(w, fmt, 4, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fake_quant(w, fmt, 4, prefer="reference")  # the reference path never warns


def test_wrapper_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # importing triton now fails
        "import torch\n"
        "from otaro.formats import torch_ref\n"
        "from otaro.formats.table import SEFPFormat\n"
        "from otaro.kernels.quant_op import SEFPFakeQuant, fake_quant, triton_reason\n"
        "fmt = SEFPFormat(group_size=16, rounding='nearest')\n"
        "w = torch.randn(3, 20, requires_grad=True)\n"
        "assert triton_reason(w, fmt) == 'Triton is not installed'\n"
        "q = SEFPFakeQuant.apply(w, fmt, 4)\n"
        "assert torch.equal(q.detach(), torch_ref.sefp_quantize(w.detach(), fmt, 4))\n"
        "q.sum().backward(); assert torch.equal(w.grad, torch.ones_like(w))\n"
        "assert 'otaro.kernels.fakequant' not in sys.modules\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- TritonSEFPLinear


@pytest.mark.parametrize("name,packed", [("sefp-g32-midpoint", True), ("ssfp-g16-nearest", False)])
def test_triton_sefp_linear_matches_sefp_linear_at_every_bits(name, packed):
    from otaro.formats import get_format
    from otaro.kernels.linear import TritonSEFPLinear
    from otaro.modules import SEFPLinear

    fmt = get_format(name)
    K, N = 70, 12  # ragged K
    torch.manual_seed(3)
    lin = torch.nn.Linear(K, N).to(DEVICE)
    layer = SEFPLinear.from_linear(lin, fmt, packed=packed)
    fast = TritonSEFPLinear.from_sefp_linear(layer, bits=4)
    fast.strict = True  # a silent fallback to the reference would hide a broken kernel
    x = torch.randn(2, 3, K, device=DEVICE)
    for bits in ALL_BITS:
        layer.set_bits(bits)
        with torch.no_grad():
            want = layer(x)
        y = fast(x, bits=bits)
        assert y.shape == want.shape == (2, 3, N)
        # Same fp32 products summed in a different order: the standard summation bound, twice.
        w = layer.quantized_weight(bits).detach()
        bound = (x.abs().reshape(-1, K).double() @ w.abs().double().T) * (2 * K * 2.0**-24) + 1e-30
        bound = bound + want.abs().reshape(-1, N).double() * 2.0**-23  # the bias add, one ulp
        assert bool(((y - want).reshape(-1, N).double().abs() <= bound).all()), (name, bits)
    assert torch.equal(fast(x), fast(x, bits=4))  # the default precision
    with pytest.raises(FormatError, match="bit-width"):
        fast(x, bits=1)
