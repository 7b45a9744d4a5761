"""otaro.kernels: the Triton bit-plane kernels against the codec, on CPU via Triton's interpreter.

The derivation and the plane reader are checked bit for bit on every stored code, rounding and
b; the matmul against the torch reference within a tolerance derived below.
"""

import inspect
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

# Before triton is imported anywhere in this process: there is no GPU on CI, and the interpreter
# runs the same kernels in numpy (correctness only).
os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from otaro.errors import FormatError, OtaroError  # noqa: E402
from otaro.formats import get_format, torch_ref  # noqa: E402
from otaro.formats.pack import pack_bitplanes, plane_indices  # noqa: E402
from otaro.formats.table import ALL_BITS, FORMATS, SEFP_ROUNDINGS, SEFPFormat  # noqa: E402
from otaro.kernels import derive, select, sefp_linear  # noqa: E402
from otaro.kernels.checks import plane_args  # noqa: E402
from otaro.kernels.planes import decode_codes  # noqa: E402
from otaro.kernels.reference import mantissa_from_planes, sefp_matmul_reference  # noqa: E402
from otaro.kernels.select import REFERENCE, TRITON, select_kernel  # noqa: E402
from otaro.kernels.sefp_matmul import TileConfig, _sefp_matmul_kernel, sefp_matmul, tile_config  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton can run neither on a GPU nor in its interpreter here", allow_module_level=True)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

ALL_CODES = np.arange(-127, 128, dtype=np.int8)


# ---------------------------------------------------------------- derivation (generated source)


@triton.jit
def _derive_kernel(m_ptr, out_ptr, n, p, lim, ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    m = tl.load(m_ptr + offs, mask=mask, other=0)
    d = derive.load_generated().derive_magnitude(tl.abs(m), p, lim, ROUNDING)
    tl.store(out_ptr + offs, tl.where(m == 0, 0, tl.where(m < 0, -d, d)), mask=mask)


def test_every_rounding_has_a_generated_triton_derivation():
    assert set(derive.ROUNDING_IDS) == set(SEFP_ROUNDINGS)
    for name in SEFP_ROUNDINGS:
        expr = derive.derivation_expression(name)
        assert f"# {name}" in derive.SOURCE and expr in derive.SOURCE
    with pytest.raises(FormatError, match="unknown SEFP rounding"):
        derive.derivation_expression("stochastic")


@pytest.mark.parametrize("rounding", list(SEFP_ROUNDINGS))  # legacy halfup too: old files decode here
def test_derivation_bit_exact_on_every_code(rounding):
    fmt = SEFPFormat(group_size=64, rounding=rounding)
    m = torch.from_numpy(ALL_CODES.astype(np.int32)).to(DEVICE)
    for bits in ALL_BITS:
        args = plane_args(fmt, bits)
        out = torch.empty_like(m)
        _derive_kernel[(1,)](m, out, m.numel(), args.p, args.lim, ROUNDING=args.rounding, BLOCK=256)
        want = torch_ref.sefp_derive_codes(m.cpu().to(torch.int8), bits, fmt).to(torch.int32)
        assert torch.equal(out.cpu(), want), (rounding, bits)


# ---------------------------------------------------------------- plane reader


def _all_codes_mantissa() -> np.ndarray:
    """Every stored code -127..127 (plus a zero to fill) as int8 [2, 128]."""
    return np.concatenate([ALL_CODES, [0]]).astype(np.int8).reshape(2, 128)


@pytest.mark.parametrize("rounding", list(SEFP_ROUNDINGS))
def test_planes_read_derive_the_same_codes_as_the_full_code(rounding):
    fmt = SEFPFormat(group_size=64, rounding=rounding)
    m8 = _all_codes_mantissa()
    planes = pack_bitplanes(m8, nonzero_plane=True)
    rng = np.random.default_rng(0)
    for bits in ALL_BITS:
        want = torch_ref.sefp_derive_codes(torch.from_numpy(m8), bits, fmt).to(torch.int32)
        # Unread planes hold garbage: a kernel that touched them would give other codes.
        noisy = planes.copy()
        for p in set(range(planes.shape[0])) - set(plane_indices(fmt, bits)):
            noisy[p] = rng.integers(0, 256, noisy[p].shape, dtype=np.uint8)
        noisy = torch.from_numpy(noisy).to(DEVICE)
        assert torch.equal(decode_codes(noisy, bits, fmt).cpu(), want), (rounding, bits)
        # The reference's torch reader sees the same codes from the same planes.
        rebuilt = mantissa_from_planes(noisy.cpu(), fmt, bits)
        assert torch.equal(torch_ref.sefp_derive_codes(rebuilt, bits, fmt).to(torch.int32), want), (rounding, bits)
        # Trunc reads a prefix of b planes: a tensor holding only those is enough.
        if plane_args(fmt, bits).nz_plane == 0:
            prefix = noisy[: plane_args(fmt, bits).planes_needed]
            assert torch.equal(decode_codes(prefix, bits, fmt).cpu(), want), (rounding, bits)


def test_planes_read_fall_with_bits():
    fmt = get_format("sefp-g32-trunc")
    assert [plane_args(fmt, b).n_sm for b in ALL_BITS] == list(ALL_BITS)
    mid = get_format("sefp-g32-midpoint")
    assert plane_args(mid, 3).nz_plane == 8 and plane_args(mid, 8).nz_plane == 0


# ---------------------------------------------------------------- matmul vs the reference

# Tolerance. Both sides accumulate in fp32 but in different orders (the kernel sums x*code per
# group and scales once, torch sums x*w over all of K), so each is within K·2^-24·(|x|@|W|^T)
# of the exact product (standard summation bound, K <= 160 here); the bound allows twice that.
# Subnormal weights (tiny-exponent rows) add at most 2^-149 per product. An fp16/bf16 output is
# then rounded from two slightly different fp32 values, which can land one output ulp apart:
# 2^-10 relative for fp16, with a floor of its smallest subnormal 2^-24 (tiny-exponent rows give
# outputs that small). bf16 allows 2 ulps (2^-6) and ignores outputs below its normal range
# (2^-126): Triton's interpreter rounds fp32 -> bf16 toward zero and gets subnormals wrong
# (seen: -4.20e-39 -> -4.96e-39), where a GPU rounds to nearest.
_OUT_ULP = {torch.float32: (0.0, 0.0), torch.float16: (2.0**-10, 2.0**-24), torch.bfloat16: (2.0**-6, 0.0)}


def _check_close(y, ref, x, w, K):
    bound = (x.abs().to(torch.float64) @ w.abs().to(torch.float64).T) * (2 * K * 2.0**-24) + K * 2.0**-149
    rel, floor = _OUT_ULP[y.dtype]
    bound = bound + torch.clamp(ref.abs().to(torch.float64) * rel, min=floor)
    err = (y.to(torch.float64) - ref.to(torch.float64)).abs()
    if y.dtype == torch.bfloat16:
        err = torch.where(ref.abs().to(torch.float64) >= 2.0**-126, err, torch.zeros_like(err))
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def _weights(N, K, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[1, : fmt.group_size] = 0.0  # an all-zero group (exponent -128 / scale 0)
    w[2] *= 2.0**-124  # tiny exponents: steps below fp32's normal range at high b
    w[3, 0] = 50.0  # one outlier group
    m8, shared = torch_ref.sefp_encode(w, fmt)
    planes = torch.from_numpy(pack_bitplanes(m8.numpy(), nonzero_plane=True))
    return planes, shared


# Every non-legacy rounding at every group size, for both scale kinds (a Latin square keeps it
# to 6 rows), plus the legacy row and one wide group; K ragged except once (K = in_p), N not a multiple of BLOCK_N.
MATMUL_CASES = [
    ("sefp-g16-trunc", 100, 40), ("sefp-g32-nearest", 100, 40), ("sefp-g64-midpoint", 100, 40),
    ("ssfp-g16-nearest", 96, 40), ("ssfp-g32-midpoint", 150, 24), ("ssfp-g64-trunc", 128, 40),
    ("sefp-g32-halfup", 70, 8), ("sefp-g128-nearest", 150, 8),  # G = 128: a group in two K chunks
]


@pytest.mark.parametrize("name,K,N", MATMUL_CASES)
def test_matmul_matches_reference(name, K, N):
    fmt = get_format(name)
    planes, shared = _weights(N, K, fmt, seed=K + N)
    g = torch.Generator().manual_seed(1)
    planes_dev, shared_dev = planes.to(DEVICE), shared.to(DEVICE)
    for M in (1, 5):
        x32 = torch.randn(M, K, generator=g)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = x32.to(dtype)
            for bits in ALL_BITS:
                y = sefp_matmul(x.to(DEVICE), planes_dev, shared_dev, bits, fmt, K).cpu()
                ref = sefp_matmul_reference(x, planes, shared, bits, fmt, K)
                w = torch_ref.sefp_dequantize(mantissa_from_planes(planes, fmt, bits), shared, bits, fmt, K)
                _check_close(y, ref, x.to(torch.float32), w, K)


@pytest.mark.parametrize("M", [12, 20])
def test_matmul_dot_tiles_and_strided_activations(M):
    # M > 8 takes the tl.dot tile (BLOCK_M = 16); M = 20 also needs a second, masked tile.
    fmt = get_format("ssfp-g32-nearest")
    K, N = 80, 24
    planes, shared = _weights(N, K, fmt, seed=M)
    assert tile_config(M, fmt.group_size).use_dot
    base = torch.randn(K, M)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = base.T.to(dtype)  # a non-contiguous view: strides go to the kernel as they are
        for bits in (2, 5, 8):
            y = sefp_matmul(x.to(DEVICE), planes.to(DEVICE), shared.to(DEVICE), bits, fmt, K).cpu()
            ref = sefp_matmul_reference(x.contiguous(), planes, shared, bits, fmt, K)
            w = torch_ref.sefp_dequantize(mantissa_from_planes(planes, fmt, bits), shared, bits, fmt, K)
            _check_close(y, ref, x.to(torch.float32), w, K)


def test_tile_config():
    assert tile_config(1, 64) == TileConfig(1, 32, 64, False)
    assert tile_config(5, 64) == TileConfig(8, 32, 32, False)  # bounded broadcast tile
    assert tile_config(5, 16).block_k == 16
    assert tile_config(64, 128) == TileConfig(16, 32, 64, True)
    with pytest.raises(FormatError, match="block_n"):
        tile_config(1, 64, block_n=24)


def test_bits_is_a_run_time_argument():
    # One compiled kernel for every b: nothing derived from bits may be a constexpr.
    params = inspect.signature(_sefp_matmul_kernel.fn).parameters
    runtime = ("n_sm", "nz_plane", "p", "lim", "exp_offset", "scale_mult")
    assert all("constexpr" not in str(params[p].annotation) for p in runtime)


def test_bad_input_is_a_clear_error():
    fmt = get_format("sefp-g16-midpoint")
    K, N = 40, 8
    planes, shared = _weights(N, K, fmt, seed=0)
    x = torch.randn(2, K)
    for bits in (1, 9):
        with pytest.raises(FormatError, match="bit-width"):
            sefp_matmul(x, planes, shared, bits, fmt, K)
    with pytest.raises(FormatError, match="float32, float16 or bfloat16"):
        sefp_matmul(x.to(torch.int32), planes, shared, 4, fmt, K)
    with pytest.raises(FormatError, match="features"):
        sefp_matmul(torch.randn(2, K + 1), planes, shared, 4, fmt, K)
    with pytest.raises(FormatError, match="nonzero_plane=True"):
        sefp_matmul(x, planes[:8], shared, 4, fmt, K)
    with pytest.raises(FormatError, match="shared values"):
        sefp_matmul(x, planes, shared.to(torch.float16), 4, fmt, K)
    with pytest.raises(FormatError, match="does not match planes"):
        sefp_matmul(torch.randn(2, 8), planes, shared, 4, fmt, 8)
    with pytest.raises(FormatError, match="SEFP formats only"):
        sefp_matmul(x, planes, shared, 4, FORMATS["int4-g16-sym"], K)
    with pytest.raises(FormatError, match="uint8"):
        sefp_matmul(x, planes.to(torch.int16), shared, 4, fmt, K)
    with pytest.raises(FormatError, match="activations on meta"):
        sefp_matmul_reference(x.to("meta"), planes, shared, 4, fmt, K)
    # numpy planes and shared values are accepted (copied to the activations' device)
    y = sefp_matmul(x.to(DEVICE), planes.numpy(), shared.numpy(), 4, fmt, K)
    assert torch.allclose(y.cpu(), sefp_matmul_reference(x, planes, shared, 4, fmt, K), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- selection and the entry point


@pytest.mark.parametrize("fmt,m,device,triton_ok,interp,want,why", [
    ("sefp-g64-trunc", 1, "cuda:0", True, False, TRITON, "GPU"),
    ("ssfp-g32-midpoint", 64, "cuda", True, False, TRITON, "M=64"),
    ("sefp-g64-trunc", 65, "cuda", True, False, REFERENCE, "dense GEMM"),
    ("sefp-g64-trunc", 1, "cuda", False, False, REFERENCE, "not installed"),
    ("sefp-g64-trunc", 1, "cpu", True, False, REFERENCE, "TRITON_INTERPRET"),
    ("sefp-g64-trunc", 1, "cpu", True, True, TRITON, "interpreter"),
    ("sefp-g64-trunc", 1, "mps", True, False, REFERENCE, "no Triton backend"),
    ("sefp-g64-trunc", 0, "cuda", True, False, REFERENCE, "empty"),
    ("int4-g64-sym", 1, "cuda", True, False, REFERENCE, "not an SEFP format"),
])
def test_select_kernel(fmt, m, device, triton_ok, interp, want, why):
    choice = select_kernel(get_format(fmt), m, 128, 64, device, triton_available=triton_ok, interpreter=interp)
    assert choice.name == want and why in choice.reason
    assert choice.is_triton == (want == TRITON)
    with pytest.raises(AttributeError):
        choice.name = "other"  # frozen


def test_select_kernel_accepts_torch_devices():
    fmt = get_format("sefp-g64-trunc")
    choice = select_kernel(fmt, 1, 64, 64, torch.device("cpu"), triton_available=True, interpreter=True)
    assert choice.is_triton


def test_sefp_linear_runs_the_chosen_path_and_falls_back(monkeypatch):
    fmt = get_format("ssfp-g16-trunc")
    K, N = 40, 12
    planes, shared = _weights(N, K, fmt, seed=5)
    x = torch.randn(2, 3, K)
    bias = torch.randn(N)
    want = sefp_matmul_reference(x.reshape(-1, K), planes, shared, 3, fmt, K).reshape(2, 3, N) + bias
    w = torch_ref.sefp_dequantize(mantissa_from_planes(planes, fmt, 3), shared, 3, fmt, K)
    for prefer in (None, "triton", "reference"):
        y = sefp_linear(x, planes, shared, 3, fmt, K, bias=bias, prefer=prefer)
        assert y.shape == (2, 3, N)
        _check_close((y - bias).reshape(-1, N), (want - bias).reshape(-1, N), x.reshape(-1, K), w, K)
    with pytest.raises(OtaroError, match="prefer"):
        sefp_linear(x, planes, shared, 3, fmt, K, prefer="cuda")
    with pytest.raises(FormatError, match="bit-width"):
        sefp_linear(x, planes, shared, 1, fmt, K)
    with pytest.raises(FormatError, match="SEFP formats only"):
        sefp_linear(x, planes, shared, 3, get_format("int4-g16-sym"), K)

    # A Triton failure that is not the user's input warns and falls back (unless strict).
    import otaro.kernels.sefp_matmul as mm

    def broken(*a, **k):
        raise RuntimeError("no ptxas")

    monkeypatch.setattr(mm, "sefp_matmul", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = sefp_linear(x, planes, shared, 3, fmt, K, bias=bias, prefer="triton")
    assert any("no ptxas" in str(c.message) for c in caught)
    assert torch.allclose(y, want)
    with pytest.raises(RuntimeError, match="no ptxas"):
        sefp_linear(x, planes, shared, 3, fmt, K, prefer="triton", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad input is never swallowed by the fallback
        with pytest.raises(FormatError, match="features"):
            sefp_linear(torch.randn(2, K + 1), planes, shared, 3, fmt, K, prefer="triton")


def test_choice_without_triton_on_this_machine(monkeypatch):
    monkeypatch.setattr(select, "triton_available", lambda: False)
    import otaro.kernels as K

    monkeypatch.setattr(K, "triton_available", lambda: False)
    assert K.choose(get_format("sefp-g64-trunc"), 1, 64, 64, "cpu").name == REFERENCE


def test_fallback_without_triton_in_a_fresh_process():
    # Importing otaro.kernels must not need Triton; with Triton blocked the entry point runs the
    # reference. A subprocess, because this one has Triton imported already.
    code = """
import sys
sys.modules["triton"] = None
import numpy as np, torch
import otaro.kernels as K
from otaro.formats import get_format, torch_ref
from otaro.formats.pack import pack_bitplanes
fmt = get_format("sefp-g16-trunc")
m8, sh = torch_ref.sefp_encode(torch.randn(4, 20), fmt)
planes = torch.from_numpy(pack_bitplanes(m8.numpy()))
assert K.choose(fmt, 1, 20, 4, "cuda").reason == "Triton is not installed"
y = K.sefp_linear(torch.randn(3, 20), planes, sh, 4, fmt, 20)
assert y.shape == (3, 4) and sys.modules["triton"] is None
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
