"""Host-side argument checks and run-time kernel arguments (no Triton import: the torch fallback
uses them too, so both paths reject the same bad input with the same message)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otaro.errors import FormatError
from otaro.formats.pack import NONZERO_PLANE, plane_indices
from otaro.formats.table import TOP_BITS, SEFPFormat

from .derive import rounding_id

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PlaneArgs:
    """Run-time kernel arguments of one (format, bits): nothing here is a constexpr except
    ``rounding``, so one compiled kernel serves every bit-width."""

    n_sm: int  # sign + magnitude planes read
    nz_plane: int  # index of the nonzero plane, or 0 when it is not read
    p: int  # 2^(8-b)
    lim: int  # 2^(b-1) - 1
    rounding: int  # ROUNDING constexpr (otaro.kernels.derive.ROUNDING_IDS)
    planes_needed: int  # how many planes the packed tensor must hold


def plane_args(fmt: SEFPFormat, bits: int) -> PlaneArgs:
    check_format(fmt)
    fmt.check_bits(bits)
    idx = plane_indices(fmt, bits)
    mag = [i for i in idx if i != NONZERO_PLANE]
    # plane_indices is a prefix of planes, plus possibly the nonzero plane: the kernel relies on it.
    assert mag == list(range(len(mag))), idx
    nz = NONZERO_PLANE if NONZERO_PLANE in idx else 0
    return PlaneArgs(n_sm=len(mag), nz_plane=nz, p=2 ** (TOP_BITS - bits), lim=2 ** (bits - 1) - 1,
                     rounding=rounding_id(fmt), planes_needed=max(idx) + 1)


def check_format(fmt) -> SEFPFormat:
    if not isinstance(fmt, SEFPFormat):
        raise FormatError(f"bit-plane kernels run SEFP formats only, got {getattr(fmt, 'name', fmt)!r}")
    return fmt


def check_planes(planes, shared, fmt: SEFPFormat, bits: int, in_features: int, device=None):
    """Validated (planes, shared, PlaneArgs, N, in_p) as contiguous torch tensors on ``device``.

    numpy inputs are copied to ``device``; torch tensors elsewhere are an error, not a silent
    copy on every call (a weight moves to its device once)."""
    args = plane_args(fmt, bits)
    planes, shared = _on_device(planes, "bit-planes", device), _on_device(shared, "shared values", device)
    if planes.dim() != 3 or planes.dtype != torch.uint8:
        raise FormatError(
            f"bit-planes must be uint8 [planes, out, in_p // 8], got {planes.dtype} {tuple(planes.shape)}")
    n_planes, N, row_bytes = planes.shape
    in_p = row_bytes * 8
    G = fmt.group_size
    if in_p % G:
        raise FormatError(f"padded in_features {in_p} is not a multiple of the group size {G}")
    if not in_p - G < in_features <= in_p:
        raise FormatError(f"in_features={in_features} does not match planes padded to {in_p} (groups of {G})")
    if n_planes < args.planes_needed:
        hint = " (pack with nonzero_plane=True)" if args.nz_plane else ""
        raise FormatError(f"{fmt.name} at {bits} bits reads {args.planes_needed} planes, got {n_planes}{hint}")
    want = torch.int8 if fmt.scale == "pow2" else torch.float16
    if tuple(shared.shape) != (N, in_p // G) or shared.dtype != want:
        raise FormatError(f"{fmt.name} shared values must be {want} [{N}, {in_p // G}], "
                          f"got {shared.dtype} {tuple(shared.shape)}")
    if planes.device != shared.device:
        raise FormatError(f"planes are on {planes.device} but shared values on {shared.device}")
    return planes.contiguous(), shared.contiguous(), args, N, in_p


def _on_device(t, what: str, device):
    if not isinstance(t, torch.Tensor):
        return torch.as_tensor(t, device=device)
    if device is not None and t.device != torch.device(device):
        raise FormatError(f"{what} are on {t.device} but the activations on {device}: move the weight there once")
    return t


def check_activations(x, in_features: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise FormatError(f"activations must be a 2-D tensor [M, in_features], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise FormatError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] != in_features:
        raise FormatError(f"activations have {x.shape[1]} features, the weight takes {in_features}")
    return x
