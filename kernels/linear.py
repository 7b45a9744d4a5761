"""``TritonSEFPLinear``: an inference linear layer that keeps SEFP bit-planes on its device and
picks the precision per call.

Built from an :class:`otaro.modules.SEFPLinear` (packed, or a master weight encoded once), it
holds :func:`otaro.formats.pack.pack_bitplanes` planes as a buffer and runs
:func:`otaro.kernels.sefp_linear` (the bit-plane GEMV/GEMM, or its torch reference) with
``forward(x, bits=None)``: one stored model, any b in 2..8, no re-dequantization and no cache
per precision, because the b-bit kernel reads only the planes b needs.
"""

from __future__ import annotations

import torch
from torch import nn

from otaro.errors import FormatError
from otaro.formats.pack import needs_nonzero_plane, pack_bitplanes
from otaro.formats.table import SEFPFormat


class TritonSEFPLinear(nn.Module):
    def __init__(self, planes: torch.Tensor, shared: torch.Tensor, fmt: SEFPFormat, in_features: int,
                 bias: torch.Tensor | None = None, bits: int | None = None):
        super().__init__()
        if not isinstance(fmt, SEFPFormat):
            raise FormatError(f"TritonSEFPLinear takes an SEFP format, got {getattr(fmt, 'name', fmt)!r}")
        self.fmt, self.in_features = fmt, in_features
        self.out_features = planes.shape[1]
        self.bits = fmt.check_bits(fmt.top_bits if bits is None else bits)
        self.register_buffer("planes", planes)
        self.register_buffer("shared", shared)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.prefer: str | None = None  # "triton" / "reference" forces a path (sefp_linear)
        self.strict = False  # True: a Triton failure raises instead of falling back

    @classmethod
    def from_sefp_linear(cls, layer, bits: int | None = None) -> "TritonSEFPLinear":
        """Planes of the layer's stored 8-bit code (the master weight is encoded, as pack_ would);
        ``bits`` defaults to the layer's current precision (8 when it has none)."""
        m8, shared = layer.codes()
        fmt = layer.fmt
        planes = pack_bitplanes(m8.detach().cpu().numpy(), nonzero_plane=needs_nonzero_plane(fmt))
        device = m8.device
        bias = None if layer.bias is None else layer.bias.detach()
        return cls(torch.from_numpy(planes).to(device), shared.detach().clone().to(device), fmt,
                   layer.in_features, bias, bits if bits is not None else layer.bits)

    def forward(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        from . import sefp_linear

        bits = self.bits if bits is None else bits
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return sefp_linear(x, self.planes, self.shared, bits, self.fmt, self.in_features, bias,
                           prefer=self.prefer, strict=self.strict)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt.name}, bits={self.bits}"
