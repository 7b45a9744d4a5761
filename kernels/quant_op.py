"""The training-time fake-quant ``Q(w, b)`` and the SEFP encoder, on Triton when it can run.

:func:`fake_quant` and :func:`encode` run the fused kernels of :mod:`otaro.kernels.fakequant`
on a CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``) and
:mod:`otaro.formats.torch_ref` everywhere else; both give the same bits. :class:`SEFPFakeQuant`
is the straight-through autograd form fine-tuning needs. This module does not import Triton
until a Triton path is taken, so the fallback works on a machine without it.
"""

from __future__ import annotations

import warnings

import torch

from otaro.errors import FormatError, OtaroError
from otaro.formats import torch_ref
from otaro.formats.table import SEFPFormat

from .checks import SUPPORTED_DTYPES
from .derive import ROUNDING_IDS
from .select import interpreter_on, triton_available


def triton_reason(w, fmt) -> str | None:
    """None when the fused kernels can run on ``w``; otherwise why not (one line, for logs)."""
    if not isinstance(fmt, SEFPFormat) or fmt.rounding not in ROUNDING_IDS:
        return f"{getattr(fmt, 'name', fmt)} has no fused SEFP kernel"
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in SUPPORTED_DTYPES:
        return "the kernels take a 2-D float32/float16/bfloat16 tensor"
    if not triton_available():
        return "Triton is not installed"
    if w.device.type == "cpu" and not interpreter_on():
        return "CPU tensors run Triton only under TRITON_INTERPRET=1"
    if w.device.type not in ("cpu", "cuda"):
        return f"no Triton backend for {w.device.type} tensors"
    return None


def _check(w: torch.Tensor, fmt, name: str, check: bool, bits: int | None = None) -> None:
    """The reference's input errors, raised before either path runs (same messages)."""
    if not isinstance(fmt, SEFPFormat):
        raise FormatError(f"SEFP fake-quant takes an SEFP format, got {getattr(fmt, 'name', fmt)!r}")
    if bits is not None:
        fmt.check_bits(bits)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise FormatError(f"tensor {name!r} must be 2-D [out, in] to quantize, got {getattr(w, 'shape', type(w))}")
    if check:
        torch_ref.check_finite(w, name)
    if isinstance(fmt, SEFPFormat) and fmt.scale == "fp16" and w.numel():
        # torch_ref.sefp_shared's fp16 overflow check; the reference makes it whatever ``check``
        # says, so this does too. (One reduction and a host sync: ssfp rows only.)
        amax = w.detach().abs().amax().to(torch.float32)
        if bool(amax / 127 > torch.finfo(torch.float16).max):
            raise FormatError(f"tensor {name!r} has weights up to {float(amax):.3g}, beyond fp16 scales")


def _run(triton_fn, reference_fn, w, fmt, prefer: str | None, strict: bool):
    if prefer not in (None, "triton", "reference"):
        raise OtaroError(f"prefer={prefer!r}: choose 'triton', 'reference' or leave it unset")
    use_triton = prefer == "triton" or (prefer is None and triton_reason(w, fmt) is None)
    if use_triton:
        try:
            from . import fakequant

            return triton_fn(fakequant)
        except OtaroError:
            raise  # bad input: the same error the reference would give, not a reason to fall back
        except Exception as e:  # no toolchain, unsupported GPU, a broken install
            if strict:
                raise
            warnings.warn(f"otaro.kernels: fused fake-quant failed ({type(e).__name__}: {e}); using the torch "
                          "reference", RuntimeWarning, stacklevel=3)
    return reference_fn()


def fake_quant(w: torch.Tensor, fmt: SEFPFormat, bits: int, *, check: bool = True, name: str = "weight",
               prefer: str | None = None, strict: bool = False) -> torch.Tensor:
    """``Q(w, b)``: ``torch_ref.sefp_quantize(w, fmt, bits)`` bit for bit, in w's dtype (no grad)."""
    _check(w, fmt, name, check, bits)
    w = w.detach()
    return _run(lambda k: k.sefp_fake_quant_triton(w, fmt, bits),
                lambda: torch_ref.sefp_quantize(w, fmt, bits, check=False), w, fmt, prefer, strict)


def encode(w: torch.Tensor, fmt: SEFPFormat, *, check: bool = True, name: str = "weight",
           prefer: str | None = None, strict: bool = False):
    """``torch_ref.sefp_encode(w, fmt)`` bit for bit: (int8 codes [out, in_p], shared)."""
    _check(w, fmt, name, check)
    w = w.detach()
    return _run(lambda k: k.sefp_encode_triton(w, fmt),
                lambda: torch_ref.sefp_encode(w, fmt, name=name, check=False), w, fmt, prefer, strict)


class SEFPFakeQuant(torch.autograd.Function):
    """Forward: :func:`fake_quant` (exact ``Q(w, b)``); backward: the gradient unchanged.

    The straight-through estimator of ``otaro.modules._StraightThrough``, with the quantization
    inside the Function so that the forward is one fused kernel. ``apply(w, fmt, bits)``."""

    @staticmethod
    def forward(ctx, w, fmt, bits, check=False):
        return fake_quant(w, fmt, bits, check=check)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None
