"""Quantized linear modules and whole-model conversion.

``SEFPLinear`` has two forms:
- *master* (training): an fp32 ``weight`` parameter; each forward computes ``Q(w, b)`` through
  the stored 8-bit code with the same derivation the runtime uses, and the backward is the
  straight-through identity (SEFP never clips, so no mask is needed).
- *packed* (inference / checkpoints): int8 ``mantissa`` and ``exponent`` buffers only; the
  weight at the current precision is derived on demand and cached until the precision changes.

``IntLinear`` is the packed form of an integer format (RTN today; GPTQ/AWQ produce the same
buffers). ``LINEAR_CLASSES`` maps a format family to its module class.
"""

from __future__ import annotations

import fnmatch
import types
from dataclasses import dataclass
from typing import Mapping, Union

import torch
from torch import nn
from torch.nn import functional as F

from otaro.arch import ArchAdapter, get_adapter, quantizable_linears
from otaro.errors import FormatError, OtaroError
from otaro.formats import Format, IntFormat, SEFPFormat, get_format
from otaro.formats import torch_ref as Q

PrecisionSpec = Union[int, None, Mapping[str, int]]


class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantized weight exactly; backward passes the gradient unchanged.

    (``w + (q - w).detach()`` would not be bit-exact: the two roundings can move q by an ulp.)
    """

    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SEFPLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: SEFPFormat, packed: bool = True,
                 bits: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.compute_dtype = dtype
        in_p = -(-in_features // fmt.group_size) * fmt.group_size
        if packed:
            self.register_buffer("mantissa", torch.zeros(out_features, in_p, dtype=torch.int8))
            self.register_buffer(fmt.shared_name, torch.zeros(out_features, in_p // fmt.group_size,
                                                              dtype=torch.int8 if fmt.scale == "pow2" else torch.float16))
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.bits = fmt.top_bits if bits is None and packed else bits
        self._cache: tuple[int, torch.Tensor] | None = None
        # A master layer's per-group shared values, frozen (``fix_shared_``) when fine-tuning
        # starts from a checkpoint's codes; None: derived from the master weight every step.
        # Not persistent: a stored layer holds its shared values under their own name, and a
        # resumed run re-applies --init before loading its state.
        self.register_buffer("fixed_shared", None, persistent=False)

    @property
    def packed(self) -> bool:
        return self.weight is None

    @property
    def shared(self) -> torch.Tensor:
        """Per-group shared value: int8 exponents (sefp) or fp16 scales (ssfp)."""
        return getattr(self, self.fmt.shared_name)

    @classmethod
    def from_codes(cls, linear: nn.Linear, fmt: SEFPFormat, mantissa: torch.Tensor, shared: torch.Tensor):
        """A packed layer from stored codes chosen by a method (GPTQ, multi-bit selection)."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, packed=True, dtype=w.dtype)
        mod.to(w.device)
        mod.mantissa.copy_(mantissa)
        mod.shared.copy_(shared)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: SEFPFormat, packed: bool = True, name: str = "weight"):
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, packed=packed,
                  dtype=w.dtype)
        mod.to(w.device)
        if packed:
            m8, e = Q.sefp_encode(w, fmt, name=name)
            mod.mantissa.copy_(m8)
            mod.shared.copy_(e)
        else:
            Q.check_finite(w, name)
            mod.weight.data.copy_(w)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def set_bits(self, bits: int | None) -> None:
        if bits is None:
            if self.packed:
                raise FormatError("a packed SEFP layer has no full-precision weight; choose bits 2-8")
        else:
            self.fmt.check_bits(bits)
        if bits != self.bits:
            self.bits, self._cache = bits, None

    def fix_shared_(self, shared: torch.Tensor) -> None:
        """Freeze the per-group shared values of a master layer: from now on its codes are the
        master weight encoded on *these* scales (weights beyond 127 steps saturate) instead of
        scales re-derived from each group's max |w|. Fine-tuning from a checkpoint's codes uses
        this, so that the start reproduces every stored code (otaro.training.init)."""
        if self.packed:
            raise FormatError("a packed SEFP layer already stores its shared values")
        want = (self.out_features, -(-self.in_features // self.fmt.group_size))
        if tuple(shared.shape) != want:
            raise FormatError(f"shared values of shape {tuple(shared.shape)} do not fit a layer with groups {want}")
        self.fixed_shared = shared.detach().clone().to(self.weight.device)
        self._cache = None

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored 8-bit (mantissa, shared): buffers, or encoded from the master weight."""
        if self.packed:
            return self.mantissa, self.shared
        if self.fixed_shared is not None:
            w = Q.pad_groups(self.weight.detach().to(torch.float32), self.fmt.group_size)
            return Q.sefp_encode_with(w, self.fixed_shared, self.fmt), self.fixed_shared
        return Q.sefp_encode(self.weight.detach(), self.fmt)

    def quantized_weight(self, bits: int | None = None) -> torch.Tensor:
        bits = self.bits if bits is None else bits
        if not self.packed:
            if bits is None:
                return self.weight
            if self.fixed_shared is None:
                q = Q.sefp_quantize(self.weight.detach(), self.fmt, bits, check=False)
            else:
                m8, shared = self.codes()
                q = Q.sefp_dequantize(m8, shared, bits, self.fmt, self.in_features, self.weight.dtype)
            return _StraightThrough.apply(self.weight, q)
        if self._cache is not None and self._cache[0] == bits:
            return self._cache[1]
        w = Q.sefp_dequantize(self.mantissa, self.shared, bits, self.fmt, self.in_features, self.compute_dtype)
        if bits == self.bits:
            self._cache = (bits, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def pack_(self) -> None:
        """Master -> packed, in place (drops the master weight)."""
        if self.packed:
            return
        m8, e = self.codes()
        del self.weight
        self.weight = None
        self.fixed_shared = None
        self.register_buffer("mantissa", m8)
        self.register_buffer(self.fmt.shared_name, e)
        self._cache = None
        if self.bits is None:
            self.bits = self.fmt.top_bits

    def extra_repr(self) -> str:
        form = "packed" if self.packed else "master"
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt.name}, bits={self.bits}, {form}"


class IntLinear(nn.Module):
    """Packed integer-format linear: codes + per-group scale (+ zero point)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: IntFormat,
                 dtype: torch.dtype = torch.float32, **_unused):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.compute_dtype = dtype
        in_p = -(-in_features // fmt.group_size) * fmt.group_size
        groups = in_p // fmt.group_size
        code_dtype = torch.int8 if fmt.symmetric else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, in_p, dtype=code_dtype))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.bits = fmt.bits
        self._cache: torch.Tensor | None = None

    packed = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: IntFormat, packed: bool = True, name: str = "weight"):
        codes, scale, zero = Q.int_encode(linear.weight.detach(), fmt, name=name)
        return cls.from_codes(linear, fmt, codes, scale, zero)

    @classmethod
    def from_codes(cls, linear: nn.Linear, fmt: IntFormat, codes, scale, zero):
        """Build from codes any int method produced (RTN, GPTQ, AWQ share this layout)."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, dtype=w.dtype).to(w.device)
        mod.qweight.copy_(codes.to(mod.qweight.dtype))
        mod.scales.copy_(scale)
        mod.zeros.copy_(zero.to(torch.uint8))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def set_bits(self, bits: int | None) -> None:
        self.fmt.check_bits(bits)

    def quantized_weight(self, bits: int | None = None) -> torch.Tensor:
        if self._cache is None:
            self._cache = Q.int_dequantize(self.qweight.to(torch.int16), self.scales, self.zeros.to(torch.int16),
                                           self.fmt, self.in_features, self.compute_dtype)
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt.name}"


LINEAR_CLASSES: dict[str, type[nn.Module]] = {"sefp": SEFPLinear, "int": IntLinear}
QUANT_LINEARS = tuple(LINEAR_CLASSES.values())


@dataclass(frozen=True)
class QuantInfo:
    """What ``convert`` did to a model (kept on ``model.otaro``)."""

    fmt: Format
    arch: str
    layers: tuple[str, ...]  # full module names of the quantized linears (the head last, when quantized)
    head: object = None  # otaro.head.HeadInfo when the head and embedding are quantized


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def convert(model: nn.Module, fmt: Format | str, packed: bool = True, bits: int | None = None,
            layer_factory=None, progress=None) -> nn.Module:
    """Replace the adapter's linears by quantized ones, in place; returns the model.

    ``layer_factory(name, linear) -> module`` lets a method (GPTQ, AWQ) supply its own codes;
    by default each family's ``from_linear`` does round-to-nearest.
    ``progress`` is an optional callable(name) invoked after each layer (for progress bars).
    """
    fmt = get_format(fmt)
    if fmt.family not in LINEAR_CLASSES:
        raise FormatError(f"format {fmt.name} is not a quantized format")
    adapter = get_adapter(model)
    if getattr(model, "otaro", None) is not None:
        raise OtaroError("model is already quantized")
    cls = LINEAR_CLASSES[fmt.family]
    names = []
    for name, linear in quantizable_linears(model, adapter).items():
        if not isinstance(linear, nn.Linear):
            raise OtaroError(f"{name} is {type(linear).__name__}, expected nn.Linear")
        mod = layer_factory(name, linear) if layer_factory else cls.from_linear(linear, fmt, packed=packed, name=name)
        _set_module(model, name, mod)
        names.append(name)
        if progress:
            progress(name)
    attach(model, QuantInfo(fmt, adapter.name, tuple(names)))
    if bits is not None or fmt.family == "sefp" and packed:
        set_precision(model, bits if bits is not None else getattr(fmt, "top_bits", None))
    return model


def attach(model: nn.Module, info: QuantInfo) -> None:
    """Record ``info`` on the model and bind ``model.set_precision`` / ``model.get_precision``."""
    model.otaro = info
    model.set_precision = types.MethodType(set_precision, model)
    model.get_precision = types.MethodType(get_precision, model)


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    info: QuantInfo | None = getattr(model, "otaro", None)
    if info is None:
        raise OtaroError("model has no quantized layers (convert it first)")
    return {name: model.get_submodule(name) for name in info.layers}


def resolve_precision(model: nn.Module, spec: PrecisionSpec) -> dict[str, int | None]:
    """Per-layer bits from an int, None (master weights) or a {pattern: bits} mapping.

    Patterns are fnmatch globs on layer names without the model prefix (``layers.0.mlp.*``);
    later entries override earlier ones, so ``{"*": 4, "layers.0.*": 8}`` reads naturally.
    Every pattern must match some layer (a typo must not silently do nothing).
    A quantized head (otaro.head) has its own precision: an int or None resets it to its
    default, and only a pattern that names it (``lm_head``, not ``*``) changes it.
    """
    from otaro.formats.precision import reaches_head

    layers = quant_layers(model)
    adapter = get_adapter(model)
    head = model.otaro.head
    head_name = head.layer if head is not None else None
    if spec is None or isinstance(spec, int) and not isinstance(spec, bool):
        return {name: (head.bits if name == head_name else spec) for name in layers}
    if not isinstance(spec, Mapping):
        raise FormatError(f"precision must be a bit-width or a {{pattern: bits}} mapping, got {spec!r}")
    out: dict[str, int | None] = {name: layer.bits for name, layer in layers.items()}
    for pattern, bits in spec.items():
        hits = [n for n in layers if n != head_name and
                (fnmatch.fnmatchcase(adapter.short_name(n), pattern) or fnmatch.fnmatchcase(n, pattern))]
        if head_name is not None and reaches_head(pattern, head_name, adapter.short_name(head_name)):
            hits.append(head_name)
        if not hits:
            example = adapter.short_name(next(iter(layers)))
            raise FormatError(f"precision pattern {pattern!r} matches no quantized layer (names look like {example!r})")
        for n in hits:
            out[n] = bits
    return out


def set_precision(model: nn.Module, spec: PrecisionSpec) -> nn.Module:
    """Set the bit-width of the whole model or of layers by pattern (validated before any change)."""
    plan = resolve_precision(model, spec)
    layers = quant_layers(model)
    for name, bits in plan.items():  # validate all first: a bad entry changes nothing
        if bits is not None:
            layers[name].fmt.check_bits(bits)
        elif layers[name].packed:
            raise FormatError("a packed model has no full-precision weights; choose bits 2-8")
    for name, bits in plan.items():
        layers[name].set_bits(bits)
    return model


def get_precision(model: nn.Module) -> dict[str, int | None]:
    return {name: layer.bits for name, layer in quant_layers(model).items()}


def pack(model: nn.Module) -> nn.Module:
    """Turn every master-form SEFP layer into its packed form, in place."""
    for layer in quant_layers(model).values():
        if isinstance(layer, SEFPLinear):
            layer.pack_()
    return model
