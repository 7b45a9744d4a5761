"""``y = x @ W_b^T`` straight from SEFP bit-planes (GEMV at batch 1, small-M GEMM up to ~64 rows).

One program computes a ``BLOCK_M x BLOCK_N`` tile of ``y`` and walks K one group at a time: the
group's shared value is loaded once, the group's codes are rebuilt from the planes
``plane_indices(fmt, bits)`` (:func:`otaro.kernels.planes.load_codes`), ``sum_k x * code`` is
accumulated in fp32 and then multiplied by the group's step. Factoring the step out of the group
is what lets the codes stay small integers (exact in fp16, so tiles of 16+ rows use ``tl.dot``,
in fp16 for fp16 x and in IEEE fp32 otherwise; smaller tiles, GEMV included, use a broadcast multiply-and-sum); for
power-of-two steps it changes nothing but the rounding order.

``bits`` only sets run-time arguments (planes read, ``p``, ``lim``, step shift), so one compiled
kernel per (rounding, scale kind, group size, tile) serves every bit-width 2..8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from otaro.errors import FormatError
from otaro.formats.table import TOP_BITS, SEFPFormat

from .checks import check_activations, check_planes
from .planes import load_codes
MAX_BLOCK_M = 16  # rows of x per program; larger M runs several programs along M
DOT_MIN_M = 16  # tl.dot needs 16-row tiles: from here on the tile multiply is a tensor-core dot
DEFAULT_BLOCK_N = 32
MAX_BLOCK_K = 64  # a group wider than this is consumed in chunks
# Below DOT_MIN_M the tile product is an explicit [BLOCK_M, BLOCK_N, BLOCK_K] broadcast; keep it
# to this many elements so it stays in registers.
MAX_PRODUCT_TILE = 8192


@triton.jit
def _pow2(e):
    """2^e as fp32 for integer e in the normal range [-126, 127], built from its bits (exact on
    every device, unlike an exp2 approximation)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _sefp_matmul_kernel(
    x_ptr, planes_ptr, shared_ptr, out_ptr,
    M, N, K, groups, row_bytes, plane_stride,
    stride_xm, stride_xk, stride_om, stride_on,
    n_sm, nz_plane, p, lim, exp_offset, scale_mult,
    ROUNDING: tl.constexpr, POW2: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, groups):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in tl.static_range(0, G, BLOCK_K):
            k0 = g * G + kk
            offs_k = k0 + tl.arange(0, BLOCK_K)
            codes = load_codes(planes_ptr, plane_stride, row_bytes, offs_n, k0, mask_n, n_sm, nz_plane, p, lim,
                               ROUNDING, BLOCK_K)
            # Ragged K: x has only K columns; the padded codes are zero, x's are masked to zero.
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            if USE_DOT:
                if x_ptr.dtype.element_ty == tl.float16:
                    # Codes are integers below 2^9, exact in fp16: an fp16 tensor-core dot with
                    # fp32 accumulation loses nothing.
                    part += tl.dot(x, tl.trans(codes.to(tl.float16)))
                else:
                    # fp32 asks for IEEE fp32 (TF32 would round x). bf16 goes the same way: its
                    # dot is not checkable here (Triton's interpreter mangles int -> bf16 and bf16
                    # dots), and at M <= 64 the kernel is bound by plane reads, not by the FMAs.
                    part += tl.dot(x.to(tl.float32), tl.trans(codes.to(tl.float32)), input_precision="ieee")
            else:
                part += tl.sum(x.to(tl.float32)[:, None, :] * codes.to(tl.float32)[None, :, :], axis=2)
        shared = tl.load(shared_ptr + offs_n.to(tl.int64) * groups + g, mask=mask_n, other=0)
        if POW2:
            # step = 2^(E - 6 + shift) may be subnormal (E >= -126 for live groups, -128 for
            # all-zero ones); two normal halves keep each factor exact.
            e = shared.to(tl.int32) + exp_offset
            e_hi = e // 2
            part = part * _pow2(e_hi)[None, :] * _pow2(e - e_hi)[None, :]
        else:
            part = part * (shared.to(tl.float32) * scale_mult)[None, :]
        acc += part
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out,
             mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class TileConfig:
    """The constexpr tile of one launch (a fixed default: autotuning is left to a benchmark)."""

    block_m: int
    block_n: int
    block_k: int
    use_dot: bool


def tile_config(m: int, group_size: int, block_n: int = DEFAULT_BLOCK_N) -> TileConfig:
    if block_n < 16 or block_n & (block_n - 1):
        raise FormatError(f"block_n={block_n} must be a power of two >= 16")
    block_m = min(MAX_BLOCK_M, triton.next_power_of_2(max(1, m)))
    if block_m >= DOT_MIN_M:
        return TileConfig(block_m, block_n, min(group_size, MAX_BLOCK_K), True)
    # A power of two >= 8 dividing G (G >= 16 is a power of two).
    block_k = max(8, min(group_size, MAX_BLOCK_K, MAX_PRODUCT_TILE // (block_m * block_n)))
    return TileConfig(block_m, block_n, block_k, False)


def sefp_matmul(x: torch.Tensor, planes, shared, bits: int, fmt: SEFPFormat, in_features: int,
                block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """``x [M, in_features] @ W_b^T -> [M, N]`` in x's dtype (fp32 accumulation) from bit-planes
    ``[P, N, in_p // 8]`` (``pack_bitplanes``) and shared values ``[N, in_p / G]``."""
    check_activations(x, in_features)
    planes, shared, args, N, in_p = check_planes(planes, shared, fmt, bits, in_features, device=x.device)
    M = x.shape[0]
    G = fmt.group_size
    tile = tile_config(M, G, block_n)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    shift = TOP_BITS - bits - fmt.rounding_spec.extra_code_bits  # step = Δ8 · 2^shift
    grid = (triton.cdiv(M, tile.block_m), triton.cdiv(N, tile.block_n))
    _sefp_matmul_kernel[grid](
        x, planes, shared, out,
        M, N, in_features, in_p // G, in_p // 8, N * (in_p // 8),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        args.n_sm, args.nz_plane, args.p, args.lim, shift - (TOP_BITS - 2), float(2.0**shift),
        ROUNDING=args.rounding, POW2=fmt.scale == "pow2", G=G,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, USE_DOT=tile.use_dot,
    )
    return out
