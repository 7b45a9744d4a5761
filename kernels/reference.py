"""The torch reference of the bit-plane matmul: the tests' oracle and the fallback path.

It takes the same inputs as :func:`otaro.kernels.sefp_matmul.sefp_matmul` and reads the same
planes (``plane_indices``), rebuilds the int8 mantissas, then defers all the math to
:func:`otaro.formats.torch_ref.sefp_dequantize` (the codec's own decode) and an fp32 matmul.
"""

from __future__ import annotations

import torch

from otaro.formats import torch_ref
from otaro.formats.pack import NONZERO_PLANE, plane_indices
from otaro.formats.table import TOP_BITS, SEFPFormat

from .checks import check_activations, check_planes


def _plane_bits(plane: torch.Tensor) -> torch.Tensor:
    """uint8 [N, in_p // 8] -> int16 bits [N, in_p] (element j of a byte at bit j)."""
    shifts = torch.arange(8, dtype=torch.int16, device=plane.device)
    return ((plane.to(torch.int16).unsqueeze(-1) >> shifts) & 1).reshape(plane.shape[0], -1)


def mantissa_from_planes(planes: torch.Tensor, fmt: SEFPFormat, bits: int) -> torch.Tensor:
    """int8 mantissas [N, in_p] from only the planes a ``bits``-bit kernel reads (the torch twin
    of :func:`otaro.formats.pack.unpack_bitplanes_for`): unread magnitude bits are zero; the
    nonzero plane, when read, sets the lowest magnitude bit."""
    idx = plane_indices(fmt, bits)
    sign = _plane_bits(planes[0]).bool()
    mag = torch.zeros(sign.shape, dtype=torch.int16, device=planes.device)
    for p in idx[1:]:
        mag |= _plane_bits(planes[p]) if p == NONZERO_PLANE else _plane_bits(planes[p]) << (TOP_BITS - 1 - p)
    return torch.where(sign, -mag, mag).to(torch.int8)


def sefp_matmul_reference(x: torch.Tensor, planes, shared, bits: int, fmt: SEFPFormat,
                          in_features: int) -> torch.Tensor:
    """``x @ W_b^T`` in fp32 from the codec's dequantized weight, cast to x's dtype."""
    check_activations(x, in_features)
    planes, shared, _, _, _ = check_planes(planes, shared, fmt, bits, in_features, device=x.device)
    w = torch_ref.sefp_dequantize(mantissa_from_planes(planes, fmt, bits), shared, bits, fmt, in_features)
    return (x.to(torch.float32) @ w.T).to(x.dtype)
