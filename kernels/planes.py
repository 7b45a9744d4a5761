"""Reading SEFP codes from bit-planes inside a Triton kernel, and the checks every host wrapper
shares.

The layout is :func:`otaro.formats.pack.pack_bitplanes`: uint8 planes ``[P, N, in_p // 8]``, plane 0
the sign, planes 1..7 the magnitude bits MSB first, optional plane 8 "nonzero"; element ``k`` of a
row sits in byte ``k // 8`` at bit ``k % 8``. A b-bit kernel reads only
``plane_indices(fmt, b)``: the sign, the top ``n_sm - 1`` magnitude planes (``n_sm`` = sign +
magnitude planes read, a run-time value) and, for midpoint below 8 bits, the nonzero plane, whose
bit is OR-ed into the lowest magnitude bit. Unread magnitude bits are zero. This reconstructed
magnitude derives to the same code as the full stored one (the tests check every code, rounding
and b): the derivations only look at the bits that are read.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from otaro.errors import FormatError
from otaro.formats.table import SEFPFormat

from .checks import plane_args
from .derive import load_generated

derive_magnitude = load_generated().derive_magnitude


@triton.jit
def _plane_bits(plane_ptr, byte_off, mask):
    """Bits [BLOCK_N, BLOCK_K // 8, 8] of one plane: each byte is loaded once and spread over
    its 8 elements (element j of a byte at bit j)."""
    byte = tl.load(plane_ptr + byte_off, mask=mask, other=0).to(tl.int32)
    return (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1


@triton.jit
def load_codes(planes_ptr, plane_stride, row_bytes, offs_n, k0, mask_n, n_sm, nz_plane, p, lim,
               ROUNDING: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 b-bit codes [len(offs_n), BLOCK_K] of rows ``offs_n``, columns ``k0 ..
    k0 + BLOCK_K`` (``k0`` and ``BLOCK_K`` multiples of 8: whole bytes)."""
    BYTES: tl.constexpr = BLOCK_K // 8
    byte_off = offs_n.to(tl.int64)[:, None] * row_bytes + (k0 // 8 + tl.arange(0, BYTES))[None, :]
    mask = mask_n[:, None]
    sign = _plane_bits(planes_ptr, byte_off, mask)
    mag = tl.zeros_like(sign)
    for pl in range(1, n_sm):  # run-time trip count: the planes below the cut are never touched
        mag = mag | (_plane_bits(planes_ptr + pl * plane_stride, byte_off, mask) << (7 - pl))
    if nz_plane > 0:
        mag = mag | _plane_bits(planes_ptr + nz_plane * plane_stride, byte_off, mask)
    # [N, bytes, 8] -> [N, BLOCK_K] row-major: element 8 * byte + bit, the layout's order.
    mag = tl.reshape(mag, (mag.shape[0], BLOCK_K))
    sign = tl.reshape(sign, (sign.shape[0], BLOCK_K))
    d = derive_magnitude(mag, p, lim, ROUNDING)
    # sign(0) = 0: a stored zero stays zero (midpoint would otherwise give ±1 half step).
    return tl.where(mag == 0, 0, tl.where(sign != 0, -d, d))


@triton.jit
def _decode_kernel(planes_ptr, out_ptr, N, in_p, row_bytes, plane_stride, n_sm, nz_plane, p, lim,
                   ROUNDING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    codes = load_codes(planes_ptr, plane_stride, row_bytes, offs_n, k0, mask_n, n_sm, nz_plane, p, lim,
                       ROUNDING, BLOCK_K)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * in_p + offs_k[None, :], codes, mask=mask_n[:, None])


def decode_codes(planes, bits: int, fmt: SEFPFormat) -> torch.Tensor:
    """int32 codes [N, in_p] at ``bits`` decoded by the kernels' own plane reader (a test and
    debugging aid; the matmul never materialises them)."""
    args = plane_args(fmt, bits)
    planes = torch.as_tensor(planes)
    if planes.dim() != 3 or planes.dtype != torch.uint8 or planes.shape[0] < args.planes_needed:
        raise FormatError(f"{fmt.name} at {bits} bits needs uint8 planes [>= {args.planes_needed}, out, in_p // 8], "
                          f"got {planes.dtype} {tuple(planes.shape)}")
    planes = planes.contiguous()
    _, N, row_bytes = planes.shape
    in_p = row_bytes * 8
    out = torch.empty(N, in_p, dtype=torch.int32, device=planes.device)
    BLOCK_N, BLOCK_K = 16, math.gcd(in_p, 64)  # in_p is a multiple of 8 by construction of the layout
    grid = (triton.cdiv(N, BLOCK_N), in_p // BLOCK_K)
    _decode_kernel[grid](planes, out, N, in_p, row_bytes, N * row_bytes, args.n_sm, args.nz_plane, args.p, args.lim,
                         ROUNDING=args.rounding, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
