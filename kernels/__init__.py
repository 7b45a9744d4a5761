"""otaro.kernels — Triton kernels reading SEFP bit-planes, each beside its torch reference.

What exists:

- :mod:`.derive` — the format table's derivations turned into one generated ``@triton.jit``
  function (``derive_magnitude``), so the formula still exists once.
- :mod:`.planes` — ``load_codes``, the in-kernel reader of the planes a b-bit kernel reads
  (``otaro.formats.pack.plane_indices``), and ``decode_codes`` (codes via that reader; tests).
- :mod:`.sefp_matmul` — ``sefp_matmul(x, planes, shared, bits, fmt, in_features)``: ``x @ W_b^T``
  for M up to ~64 rows (GEMV at batch 1), ``bits`` a run-time argument, fp32 accumulation.
- :mod:`.reference` — ``sefp_matmul_reference``, the same op in torch (oracle and fallback).
- :mod:`.select` — ``select_kernel``, a pure function choosing between the two.
- :mod:`.checks` — the input checks and run-time kernel arguments both paths share (no Triton).
- :mod:`.fakequant` — fused Triton SEFP encoder (``sefp_encode_triton``) and fake-quant
  (``sefp_fake_quant_triton``: ``Q(w, b)`` in one pass, the int8 code never written), bit-exact
  with :mod:`otaro.formats.torch_ref` for both scale kinds, fp32/fp16/bf16 weights.
- :mod:`.quant_op` — ``fake_quant`` / ``encode`` (Triton when it can run, torch_ref otherwise)
  and ``SEFPFakeQuant``, the straight-through autograd Function of fine-tuning (no Triton import).
- :mod:`.linear` — ``TritonSEFPLinear``: bit-planes as a buffer, ``forward(x, bits=None)`` through
  :func:`sefp_linear`.

The planes are :func:`otaro.formats.pack.pack_bitplanes`'s layout (with the nonzero plane for
midpoint). :func:`sefp_linear` runs whichever path :func:`select_kernel` picks and can always
fall back to the reference. Importing this package does not import Triton.
"""

from __future__ import annotations

import warnings

import torch

from otaro.errors import OtaroError

from .checks import check_activations, plane_args
from .linear import TritonSEFPLinear
from .quant_op import SEFPFakeQuant, fake_quant
from .select import REFERENCE, TRITON, KernelChoice, interpreter_on, select_kernel, triton_available

__all__ = ["REFERENCE", "TRITON", "KernelChoice", "SEFPFakeQuant", "TritonSEFPLinear", "choose", "fake_quant",
           "select_kernel", "sefp_linear"]


def choose(fmt, m: int, k: int, n: int, device) -> KernelChoice:
    """:func:`select_kernel` with this machine's facts (Triton importable, interpreter on)."""
    return select_kernel(fmt, m, k, n, device, triton_available=triton_available(), interpreter=interpreter_on())


def sefp_linear(x: torch.Tensor, planes, shared, bits: int, fmt, in_features: int, bias: torch.Tensor | None = None,
                *, prefer: str | None = None, strict: bool = False) -> torch.Tensor:
    """``x [..., in_features] @ W_b^T (+ bias)`` from bit-planes, in x's dtype.

    ``prefer`` forces ``"triton"`` or ``"reference"`` (default: :func:`choose`). A Triton failure
    other than bad input (an OtaroError) warns and falls back to the reference unless ``strict``."""
    from .reference import sefp_matmul_reference

    if prefer not in (None, "triton", "reference"):
        raise OtaroError(f"prefer={prefer!r}: choose 'triton', 'reference' or leave it unset")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise OtaroError(f"activations must be a tensor [..., {in_features}], got {getattr(x, 'shape', type(x))}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # Bad input fails here, the same way whichever path would run (and before any fallback).
    plane_args(fmt, bits)
    check_activations(x2, in_features)
    n = planes.shape[1] if getattr(planes, "ndim", 0) == 3 else 0  # a bad shape meets check_planes' error
    choice = choose(fmt, x2.shape[0], in_features, n, x2.device)
    use_triton = prefer == "triton" or (prefer is None and choice.is_triton)
    y = None
    if use_triton:
        try:
            from .sefp_matmul import sefp_matmul

            y = sefp_matmul(x2, planes, shared, bits, fmt, in_features)
        except OtaroError:
            raise
        except Exception as e:  # compile/launch trouble (no toolchain, unsupported GPU): not the user's input
            if strict:
                raise
            warnings.warn(f"otaro.kernels: Triton path failed ({type(e).__name__}: {e}); using the torch reference",
                          RuntimeWarning, stacklevel=2)
    if y is None:
        y = sefp_matmul_reference(x2, planes, shared, bits, fmt, in_features)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])
