"""Fused SEFP encoder and fake-quant in Triton: the training-time ``Q(w, b)`` in one pass.

One program owns a ``BLOCK_N x G`` tile: ``BLOCK_N`` rows of one group. It loads the group once,
takes its max |w|, makes the shared value, encodes every weight to the stored 8-bit code with the
row's encoder and, for the fake-quant, derives the b-bit code with the generated derivation
(:mod:`otaro.kernels.derive`) and multiplies by the step, all in registers: the int8 code is
never written. :func:`sefp_encode_triton` stores the code and the shared value instead.

Every step reproduces :mod:`otaro.formats.torch_ref` bit for bit, so each is an exact operation
on every device rather than an approximation that happens to agree on one:

- the exponent E = floor(log2 max|w|) is read from the fp32 bits (max|w| is normal: smaller
  groups are flushed, as in the reference), not from a ``log2`` that can round up;
- |w| / Δ8 is |w| · 2^(6-E) in the reference's two power-of-two halves (a lone 2^(6-E) overflows
  fp32 for E <= -122), each built from its bits (:func:`otaro.kernels.sefp_matmul._pow2`);
- the ssfp scale fp16(max|w| / 127) and |w| / Δ8 use the correctly rounded ``div_rn``, because
  Triton's plain ``/`` on a GPU is an approximate division;
- round-half-even is integer arithmetic on ``floor`` and the exact remainder (no libdevice
  ``rint``, no 2^23 magic constant that fast-math could fold away);
- code · step is exact (a < 9-bit integer times a power of two, or times an fp16 scale).

``bits`` only sets run-time arguments (``p``, ``lim``, the step's shift), so one compiled kernel
per (rounding, scale kind, G, BLOCK_N, dtypes) serves every bit-width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otaro.errors import FormatError
from otaro.formats.table import TOP_BITS, ZERO_GROUP_EXPONENT, SEFPFormat

from .checks import SUPPORTED_DTYPES, check_format
from .derive import load_generated, rounding_id
from .sefp_matmul import _pow2

derive_magnitude = load_generated().derive_magnitude

# Elements per program: enough to amortise a launch (and the interpreter's per-program cost),
# small enough to stay in registers on a GPU.
TILE_ELEMENTS = 4096
_MIN_NORMAL_BITS = 1 << 23  # fp32 bit pattern of 2^-126: groups below it are flushed to zero


@triton.jit
def _load_group(w_ptr, N, K, stride_n, stride_k, G: tl.constexpr, BLOCK_N: tl.constexpr, BF16: tl.constexpr):
    """fp32 tile [BLOCK_N, G] of rows ``pid0 * BLOCK_N ..`` and group ``pid1``, zero-padded past
    K (the ragged last group) and past N; plus the row offsets and the column offsets.

    bf16 weights arrive as their int16 bits (``BF16``): bf16 -> fp32 is a 16-bit shift, exact
    on every device, whereas Triton's interpreter converts bf16 subnormals wrongly."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * G + tl.arange(0, G)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_n + offs_k.to(tl.int64)[None, :] * stride_k
    if BF16:
        w = (tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # the reference encodes in fp32 too
    return w, offs_n, offs_k


@triton.jit
def _rint_nonneg(x):
    """Round-half-even of x in [0, 2^23): floor plus a carry decided on the exact remainder."""
    f = x.to(tl.int32)  # truncation == floor for x >= 0
    r = x - f.to(tl.float32)  # exact: x and floor(x) share the exponent range below 2^23
    up = (r > 0.5) | ((r == 0.5) & ((f & 1) == 1))
    return f + up.to(tl.int32)


@triton.jit
def _encode_tile(w, SCALE_POW2: tl.constexpr, RINT: tl.constexpr):
    """(M8 int32 [BLOCK_N, G] in 0..127, per-row shared value, per-row live mask) of a tile.

    The shared value is the int32 exponent E (ZERO_GROUP_EXPONENT when not live) for pow2 rows,
    the fp16 scale for ssfp rows."""
    mag = tl.abs(w)
    amax = tl.max(mag, axis=1)
    if SCALE_POW2:
        amax_bits = amax.to(tl.int32, bitcast=True)
        live = amax_bits >= 8388608  # _MIN_NORMAL_BITS: amax >= 2^-126, so amax is a normal float
        E = tl.where(live, (amax_bits >> 23) - 127, -128)  # -128: ZERO_GROUP_EXPONENT
        # |w| · 2^(6-E) as the reference splits it: floor half first, each a normal power of two.
        shift = 6 - tl.where(live, E, 0)  # 6 = TOP_BITS - 2; dead groups scale by anything finite
        half = tl.where(shift >= 0, shift // 2, -((1 - shift) // 2))  # floor(shift / 2)
        scaled = mag * _pow2(half)[:, None] * _pow2(shift - half)[:, None]
        shared = E
    else:
        s = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)).to(tl.float16)
        live = s > 0
        d = tl.where(live, s.to(tl.float32), 1.0)
        scaled = tl.math.div_rn(mag, tl.broadcast_to(d[:, None], mag.shape))
        shared = s
    if RINT:
        m8 = _rint_nonneg(scaled)
    else:
        m8 = scaled.to(tl.int32)  # floor (scaled >= 0)
    m8 = tl.minimum(m8, 127)
    m8 = tl.where(live[:, None], m8, 0)
    return m8, shared, live


@triton.jit
def _encode_kernel(w_ptr, m8_ptr, shared_ptr, N, K, in_p, groups, stride_n, stride_k,
                   SCALE_POW2: tl.constexpr, RINT: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BF16: tl.constexpr):
    w, offs_n, offs_k = _load_group(w_ptr, N, K, stride_n, stride_k, G, BLOCK_N, BF16)
    m8, shared, live = _encode_tile(w, SCALE_POW2, RINT)
    # w < 0 and signbit(w) differ only at -0.0, whose magnitude is 0 either way.
    code = tl.where(w < 0, -m8, m8)
    row_ok = offs_n < N
    tl.store(m8_ptr + offs_n.to(tl.int64)[:, None] * in_p + offs_k[None, :], code.to(tl.int8),
             mask=row_ok[:, None])  # padded columns too: their code is 0, as the reference stores
    if SCALE_POW2:
        tl.store(shared_ptr + offs_n.to(tl.int64) * groups + tl.program_id(1), shared.to(tl.int8), mask=row_ok)
    else:
        tl.store(shared_ptr + offs_n.to(tl.int64) * groups + tl.program_id(1), shared, mask=row_ok)


@triton.jit
def _fake_quant_kernel(w_ptr, q_ptr, N, K, stride_n, stride_k, stride_qn, stride_qk, p, lim, exp_offset, scale_mult,
                       ROUNDING: tl.constexpr, SCALE_POW2: tl.constexpr, RINT: tl.constexpr,
                       G: tl.constexpr, BLOCK_N: tl.constexpr, BF16: tl.constexpr):
    w, offs_n, offs_k = _load_group(w_ptr, N, K, stride_n, stride_k, G, BLOCK_N, BF16)
    m8, shared, live = _encode_tile(w, SCALE_POW2, RINT)
    d = derive_magnitude(m8, p, lim, ROUNDING)
    # sign(0) = 0: a stored zero stays zero (midpoint would otherwise give half a step).
    code = tl.where(m8 == 0, 0, tl.where(w < 0, -d, d)).to(tl.float32)
    if SCALE_POW2:
        # step = 2^(E - 6 + shift), possibly subnormal: two normal halves keep both products exact.
        e = shared + exp_offset
        e_hi = tl.where(e >= 0, e // 2, -((1 - e) // 2))
        q = code * _pow2(e_hi)[:, None] * _pow2(e - e_hi)[:, None]
    else:
        q = code * (shared.to(tl.float32) * scale_mult)[:, None]
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    if BF16:
        # fp32 -> bf16 round-to-nearest-even on the bit pattern (q is finite), as torch's .to()
        # does; exact on every device, which the interpreter's own bf16 conversion is not.
        qb = q.to(tl.int32, bitcast=True)
        out = ((qb + 0x7FFF + ((qb >> 16) & 1)) >> 16).to(tl.int16)
    else:
        out = q.to(q_ptr.dtype.element_ty)  # fp16: round-to-nearest-even, as torch's .to()
    tl.store(q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn + offs_k[None, :] * stride_qk, out, mask=mask)


def _check_weight(w, fmt) -> SEFPFormat:
    fmt = check_format(fmt)
    rounding_id(fmt)  # a rounding without a derivation fails before any launch
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise FormatError(f"weight must be a 2-D tensor [out, in], got {getattr(w, 'shape', type(w))}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise FormatError(f"weight must be float32, float16 or bfloat16, got {w.dtype}")
    return fmt


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors as their int16 bits (same strides); other dtypes unchanged."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch_shape(w: torch.Tensor, fmt: SEFPFormat):
    N, K = w.shape
    G = fmt.group_size
    groups = triton.cdiv(K, G)
    block_n = max(1, min(triton.next_power_of_2(max(N, 1)), TILE_ELEMENTS // G))
    return N, K, G, groups, block_n, (triton.cdiv(N, block_n), groups)


def sefp_encode_triton(w: torch.Tensor, fmt: SEFPFormat):
    """``torch_ref.sefp_encode(w, fmt, check=False)`` in one kernel: (int8 codes [out, in_p],
    shared [out, groups]: int8 exponents or fp16 scales). Finiteness is the caller's check."""
    fmt = _check_weight(w, fmt)
    N, K, G, groups, block_n, grid = _launch_shape(w, fmt)
    pow2 = fmt.scale == "pow2"
    m8 = torch.empty(N, groups * G, dtype=torch.int8, device=w.device)
    shared = torch.empty(N, groups, dtype=torch.int8 if pow2 else torch.float16, device=w.device)
    if N == 0 or K == 0:
        return m8, shared
    _encode_kernel[grid](_bits_view(w), m8, shared, N, K, groups * G, groups, w.stride(0), w.stride(1),
                         SCALE_POW2=pow2, RINT=fmt.rounding_spec.encoder == "rint", G=G, BLOCK_N=block_n,
                         BF16=w.dtype == torch.bfloat16)
    return m8, shared


def sefp_fake_quant_triton(w: torch.Tensor, fmt: SEFPFormat, bits: int) -> torch.Tensor:
    """``torch_ref.sefp_quantize(w, fmt, bits, check=False)`` in one kernel, in w's dtype."""
    fmt = _check_weight(w, fmt)
    fmt.check_bits(bits)
    N, K, G, groups, block_n, grid = _launch_shape(w, fmt)
    q = torch.empty(N, K, dtype=w.dtype, device=w.device)
    if N == 0 or K == 0:
        return q
    shift = TOP_BITS - bits - fmt.rounding_spec.extra_code_bits  # step = Δ8 · 2^shift
    _fake_quant_kernel[grid](
        _bits_view(w), _bits_view(q), N, K, w.stride(0), w.stride(1), q.stride(0), q.stride(1),
        2 ** (TOP_BITS - bits), 2 ** (bits - 1) - 1, shift - (TOP_BITS - 2), float(2.0**shift),
        ROUNDING=rounding_id(fmt), SCALE_POW2=fmt.scale == "pow2", RINT=fmt.rounding_spec.encoder == "rint",
        G=G, BLOCK_N=block_n, BF16=w.dtype == torch.bfloat16,
    )
    return q


assert ZERO_GROUP_EXPONENT == -128 and _MIN_NORMAL_BITS == 8388608  # literals inside the kernels
