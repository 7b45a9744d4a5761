"""Packed weight layouts (numpy only: the torch-free runtime and the exporter both use them).

Two layouts, each with its unpacker so tests can round-trip them:

**Bit-planes** (GPU kernels, DESIGN.md §3). The int8 sign-magnitude mantissas ``m8 [out, in_p]``
are re-laid as planes ``[n, out, in_p // 8]`` of uint8:

- plane 0 (``SIGN_PLANE``): 1 where ``m8 < 0``;
- planes 1..7: the magnitude bits of ``|m8|`` from most significant (bit 6, plane 1) to least
  significant (bit 0, plane 7);
- plane 8 (``NONZERO_PLANE``, only with ``nonzero_plane=True``): 1 where ``m8 != 0``. The
  ``midpoint`` rounding needs it below 8 bits: a code whose top b-1 magnitude bits are all zero
  decodes to ±Δ_b/2 if the stored code is nonzero and to 0 if it is zero, which the first b
  planes cannot tell apart.

Each plane packs 8 consecutive ``in`` elements per byte, **element j of a byte at bit j**
(little-endian, ``numpy.packbits(bitorder="little")``): element ``k`` of a row lives in byte
``k // 8`` at bit ``k % 8``. A b-bit kernel reads only the planes ``plane_indices(fmt, b)``
(``fmt.planes_read(b)`` of them: b for trunc, b+1 for nearest and midpoint, at most 8), so its
memory traffic falls with b.

**onnxruntime ``com.microsoft.MatMulNBits``** (docs/FACTS.md). ``B`` is uint8
``[N, K_p / block, block * c / 8]`` holding unsigned c-bit values packed low bits first (value
``k`` of a block at bits ``(k * c) % 8`` of byte ``k * c // 8``); ``scales`` are ``[N, blocks]``
(ORT 1.32 also takes them flat, ``[N * blocks]``, as older consumers require: ``reshape(-1)``);
``zero_points`` (optional) are uint8 ``[N * ceil(blocks * c / 8)]``, packed the same way within
each row, every row starting on a fresh byte. Without ``zero_points`` ORT uses ``2^(c-1)``, so a
signed code ``q`` is stored as ``q + 2^(c-1)``. ORT's CPU kernel runs c in {2, 4, 8}
(``CONTAINERS``); a b-bit SEFP code rides in ``fmt.container_bits(b)``.

Everything is vectorised; no Python loops over elements.
"""

from __future__ import annotations

import numpy as np

from otaro.errors import FormatError
from otaro.formats.intq import IntTensor
from otaro.formats.sefp import SEFPTensor, derive_codes, step_scale
from otaro.formats.table import CONTAINERS, TOP_BITS, SEFPFormat

SIGN_PLANE = 0
N_PLANES = TOP_BITS  # sign + 7 magnitude planes
NONZERO_PLANE = TOP_BITS  # the optional 9th plane
_MAG_BITS = TOP_BITS - 1


# --------------------------------------------------------------------------- bit-planes


def _check_mantissa(mantissa: np.ndarray) -> np.ndarray:
    m = np.asarray(mantissa)
    if m.ndim != 2 or m.dtype != np.int8:
        raise FormatError(f"mantissas must be int8 [out, in_padded], got {m.dtype} {m.shape}")
    if m.shape[1] % 8:
        raise FormatError(f"in_padded={m.shape[1]} is not a multiple of 8: bit-planes pack 8 codes per byte")
    if (m == -128).any():
        raise FormatError("mantissa -128 has no 7-bit magnitude: SEFP codes lie in [-127, 127]")
    return m


def needs_nonzero_plane(fmt: SEFPFormat) -> bool:
    """Whether this rounding's kernels read the nonzero plane (midpoint below 8 bits)."""
    return fmt.rounding == "midpoint"


def pack_bitplanes(mantissa: np.ndarray, *, nonzero_plane: bool = False) -> np.ndarray:
    """int8 mantissas [out, in_p] -> uint8 planes [8 (+1 nonzero), out, in_p // 8]."""
    m = _check_mantissa(mantissa)
    mag = np.abs(m.astype(np.int16)).astype(np.uint8)
    # One plane at a time (8 or 9 whole-array steps) keeps the unpacked temporary at one
    # [out, in_p] bool array instead of eight.
    bits = [m < 0] + [(mag >> np.uint8(_MAG_BITS - p)) & np.uint8(1) for p in range(1, N_PLANES)]
    if nonzero_plane:
        bits.append(m != 0)
    return np.stack([np.packbits(b.astype(bool), axis=-1, bitorder="little") for b in bits])


def _plane_bits(planes: np.ndarray, index) -> np.ndarray:
    return np.unpackbits(planes[index], axis=-1, bitorder="little")


def unpack_bitplanes(planes: np.ndarray, n_planes: int = N_PLANES) -> np.ndarray:
    """int8 mantissas from the first ``n_planes`` planes (sign + top n-1 magnitude bits; the
    lower magnitude bits read as zero). ``n_planes=8`` inverts :func:`pack_bitplanes`."""
    planes = np.asarray(planes)
    if planes.ndim != 3 or planes.dtype != np.uint8 or planes.shape[0] < 1:
        raise FormatError(f"bit-planes must be uint8 [planes, out, in_p // 8], got {planes.dtype} {planes.shape}")
    if not 1 <= n_planes <= min(N_PLANES, planes.shape[0]):
        raise FormatError(f"cannot read {n_planes} planes from {planes.shape[0]} (sign + 7 magnitude at most)")
    sign, mag = _sign_magnitude(planes, n_planes)
    return np.where(sign, -mag, mag).astype(np.int8)


def _sign_magnitude(planes: np.ndarray, n_planes: int) -> tuple[np.ndarray, np.ndarray]:
    sign = _plane_bits(planes, SIGN_PLANE).astype(bool)
    mag = np.zeros(sign.shape, dtype=np.int16)
    for p in range(1, n_planes):  # at most 7 whole-array steps, not a loop over elements
        mag |= _plane_bits(planes, p).astype(np.int16) << (_MAG_BITS - p)
    return sign, mag


def plane_indices(fmt: SEFPFormat, bits: int) -> tuple[int, ...]:
    """The planes a ``bits``-bit kernel reads, in order; ``len == fmt.planes_read(bits)``."""
    n = fmt.planes_read(bits)
    if needs_nonzero_plane(fmt) and bits < TOP_BITS:
        return tuple(range(bits)) + (NONZERO_PLANE,)
    return tuple(range(n))


def unpack_bitplanes_for(planes: np.ndarray, fmt: SEFPFormat, bits: int) -> np.ndarray:
    """int8 mantissas rebuilt from only the planes a ``bits``-bit kernel reads, such that
    ``derive_codes(result, bits, fmt) == derive_codes(stored, bits, fmt)`` (the kernel's view).

    For midpoint the nonzero plane sets the lowest magnitude bit, which below 8 bits only
    changes the answer of "is M8 > 0?" (the bits under the cut are otherwise ignored)."""
    planes = np.asarray(planes)
    idx = plane_indices(fmt, bits)
    n_mag = [p for p in idx if p != NONZERO_PLANE]
    if NONZERO_PLANE in idx and planes.shape[0] <= NONZERO_PLANE:
        raise FormatError(f"{fmt.name} at {bits} bits reads the nonzero plane: pack with nonzero_plane=True")
    if NONZERO_PLANE not in idx:
        return unpack_bitplanes(planes, len(n_mag))
    # Sign and magnitude stay apart until the nonzero bit is in: a negative code whose top
    # bits are all zero must not collapse to +0 before it.
    sign, mag = _sign_magnitude(planes, len(n_mag))
    mag |= _plane_bits(planes, NONZERO_PLANE).astype(np.int16)
    return np.where(sign, -mag, mag).astype(np.int8)


def pack_sefp_bitplanes(t: SEFPTensor) -> np.ndarray:
    """The bit-plane layout of an encoded weight, with the nonzero plane when its format needs it."""
    return pack_bitplanes(t.mantissa, nonzero_plane=needs_nonzero_plane(t.fmt))


def bitplane_bytes_read(fmt: SEFPFormat, bits: int, out_features: int, in_features: int) -> int:
    """Bytes a ``bits``-bit bit-plane matmul reads for one [out, in] weight: the planes it
    reads (``fmt.planes_read(bits)`` of ``out * in_p / 8`` bytes each) plus the int8 exponents."""
    G = fmt.group_size
    groups = -(-in_features // G)
    in_p = groups * G
    return fmt.planes_read(bits) * out_features * (in_p // 8) + out_features * groups * fmt.exponent_bits // 8


# --------------------------------------------------------------------------- MatMulNBits


def _check_container(bits: int) -> int:
    if isinstance(bits, bool) or bits not in CONTAINERS:
        raise FormatError(f"MatMulNBits container of {bits!r} bits is not supported: choose one of {list(CONTAINERS)}")
    return bits


def _check_block(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 16 or (
        block_size & (block_size - 1)
    ):
        raise FormatError(f"MatMulNBits block size {block_size!r} must be a power of two >= 16")
    return int(block_size)


def _pack_low_first(u: np.ndarray, bits: int) -> np.ndarray:
    """uint values [..., L] (L * bits divisible by 8) -> bytes [..., L * bits / 8], value k of
    the row at bit (k * bits) % 8 of byte k * bits // 8."""
    per = 8 // bits
    u = u.astype(np.uint8).reshape(*u.shape[:-1], u.shape[-1] // per, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint8)


def _unpack_low_first(b: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    u = (b[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return u.reshape(*b.shape[:-1], b.shape[-1] * per)


def pack_matmulnbits_unsigned(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes [N, K_p] in [0, 2^bits) -> uint8 B [N, K_p / block, block * bits / 8]."""
    _check_container(bits)
    _check_block(block_size)
    q = np.asarray(codes)
    if q.ndim != 2 or q.shape[1] % block_size:
        raise FormatError(f"codes must be [N, K_padded] with K_padded a multiple of {block_size}, got {q.shape}")
    if q.size and (q.min() < 0 or q.max() >= 2**bits):
        raise FormatError(f"codes [{q.min()}, {q.max()}] do not fit an unsigned {bits}-bit container")
    N, K = q.shape
    return _pack_low_first(q, bits).reshape(N, K // block_size, block_size * bits // 8)


def unpack_matmulnbits_unsigned(B: np.ndarray, bits: int, K: int | None = None) -> np.ndarray:
    """uint8 B [N, blocks, blob] -> unsigned codes uint8 [N, K] (K defaults to all of K_p)."""
    _check_container(bits)
    B = np.asarray(B)
    if B.ndim != 3 or B.dtype != np.uint8:
        raise FormatError(f"MatMulNBits B must be uint8 [N, blocks, blob], got {B.dtype} {B.shape}")
    u = _unpack_low_first(B.reshape(B.shape[0], -1), bits)
    return u if K is None else u[:, :K]


def pack_matmulnbits(codes: np.ndarray, container_bits: int, block_size: int) -> np.ndarray:
    """Signed codes [N, K_p] in [-2^(c-1), 2^(c-1)) -> B storing ``code + 2^(c-1)`` (the zero
    point ORT assumes when the node has no zero_points input)."""
    c = _check_container(container_bits)
    q = np.asarray(codes)
    if not np.issubdtype(q.dtype, np.integer):
        raise FormatError(f"codes must be integers, got {q.dtype}")
    half = 2 ** (c - 1)
    if q.size and (q.min() < -half or q.max() >= half):
        raise FormatError(f"signed codes [{q.min()}, {q.max()}] do not fit a {c}-bit container")
    return pack_matmulnbits_unsigned(q.astype(np.int16) + half, c, block_size)


def unpack_matmulnbits(B: np.ndarray, bits: int, K: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_matmulnbits`: signed int16 codes [N, K]."""
    return unpack_matmulnbits_unsigned(B, bits, K).astype(np.int16) - 2 ** (bits - 1)


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, blocks] in [0, 2^bits) -> uint8 [N * ceil(blocks * bits / 8)]: each row
    packed low bits first and padded with zeros to a whole byte, rows concatenated."""
    _check_container(bits)
    z = np.asarray(zero)
    if z.ndim != 2:
        raise FormatError(f"zero points must be [N, blocks], got shape {z.shape}")
    if z.size and (z.min() < 0 or z.max() >= 2**bits):
        raise FormatError(f"zero points [{z.min()}, {z.max()}] do not fit {bits} bits")
    per = 8 // bits
    z = np.pad(z.astype(np.uint8), ((0, 0), (0, (-z.shape[1]) % per)))
    return _pack_low_first(z, bits).reshape(-1)


def unpack_zero_points(packed: np.ndarray, bits: int, N: int, blocks: int) -> np.ndarray:
    """Inverse of :func:`pack_zero_points`: uint8 [N, blocks]."""
    _check_container(bits)
    row = -(-blocks * bits // 8)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size != N * row:
        raise FormatError(f"packed zero points have {packed.size} bytes, expected {N} x {row}")
    return _unpack_low_first(packed.reshape(N, row), bits)[:, :blocks]


def sefp_to_matmulnbits(t: SEFPTensor, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(B, scales float32 [N, blocks], container bits) of an SEFP weight at ``bits``: the signed
    derived code in the smallest container, scale = the step at ``bits``, no zero points. Exact."""
    fmt = t.fmt
    c = fmt.container_bits(bits)
    if c is None:
        raise FormatError(
            f"{fmt.name} at {bits} bits needs a {fmt.code_bits(bits)}-bit signed code, wider than any "
            f"MatMulNBits container {list(CONTAINERS)}: use a dequantized float path"
        )
    codes = derive_codes(t.mantissa, bits, fmt)
    B = pack_matmulnbits(codes, c, fmt.group_size)
    scales = step_scale(t.shared, bits, fmt)
    return B, scales, c


def int_to_matmulnbits(t: IntTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales float32 [N, blocks], zero_points or None) of an integer weight, in the
    container ``fmt.container_bits()``: symmetric codes are stored offset by 2^(c-1) without
    zero points; asymmetric ones unsigned with packed zero points."""
    fmt = t.fmt
    c = fmt.container_bits()
    if c is None:  # cannot happen for bits <= 8; kept so a new row fails loudly
        raise FormatError(f"{fmt.name} has no MatMulNBits container")
    scales = np.asarray(t.scale, dtype=np.float32)
    if fmt.symmetric:
        return pack_matmulnbits(t.codes, c, fmt.group_size), scales, None
    B = pack_matmulnbits_unsigned(t.codes, c, fmt.group_size)
    return B, scales, pack_zero_points(t.zero, c)
