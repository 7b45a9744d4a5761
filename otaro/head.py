"""The LM head and the input embedding, quantized (``--head-bits``).

On a small model the vocabulary matrices dominate what a decode step reads: SmolLM2-135M's tied
49152x576 head is 113 MB in fp32, against ~60 MB for every decoder linear together at 4 bits.
So by default both are stored as SEFP codes of the model's own format:

- the **head** becomes an :class:`~otaro.modules.SEFPLinear` with a precision of its own
  (``bits``, default 8). It is listed among the quantized layers, but a plain bit-width switch
  (``set_precision(4)``) leaves it at its own default; a per-layer spec addresses it by name
  (``{"lm_head": 6}``). Patterns that begin with a wildcard never reach it, so ``{"*": 4}``
  means "every decoder linear".
- the **embedding** becomes an :class:`SEFPEmbedding` that gathers rows of a stored code and
  decodes only those, always at the format's top precision (a lookup reads one row per token,
  so a lower precision would save nothing). A tied embedding reads the head's own code: the
  tied weight is stored once, on disk and in memory.

``bits=None`` (``--head-bits float``) leaves both in the model's float dtype, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from otaro.errors import FormatError, OtaroError
from otaro.formats import SEFPFormat
from otaro.formats import torch_ref as Q

DEFAULT_HEAD_BITS = 8


def default_head_bits(fmt: SEFPFormat) -> int:
    """8, or the highest precision whose code fits a MatMulNBits container (midpoint's 8-bit code
    has 9 bits: its head defaults to 7, so fixed-precision variants can pack it)."""
    fits = [b for b in fmt.bits if b <= DEFAULT_HEAD_BITS and fmt.container_bits(b)]
    return max(fits) if fits else DEFAULT_HEAD_BITS


@dataclass(frozen=True)
class HeadInfo:
    """What :func:`quantize_head` did (kept on ``QuantInfo.head``, recorded in manifests)."""

    layer: str  # full module name of the head (an SEFPLinear, listed in QuantInfo.layers)
    embedding: str  # full module name of the input embedding (an SEFPEmbedding)
    tied: bool  # the embedding reads the head's code (one stored tensor)
    bits: int  # the head's default precision

    def record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, rec: dict, error=OtaroError) -> "HeadInfo":
        try:
            info = cls(str(rec["layer"]), str(rec["embedding"]), bool(rec["tied"]), int(rec["bits"]))
        except (KeyError, TypeError, ValueError):
            raise error(f"the head record {rec!r} needs layer, embedding, tied and bits") from None
        if not 2 <= info.bits <= 8:
            raise error(f"the head record's bits {info.bits} are not 2-8")
        return info


class SEFPEmbedding(nn.Module):
    """An embedding whose table is an SEFP code ``[num_embeddings, dim_padded]`` (the layout of
    a linear ``dim -> num_embeddings``), decoded row by row at the format's top precision.

    Tied: the code is the head's (``source``, an SEFPLinear held as a plain attribute, not a
    submodule, so the state dict holds it once). Untied: own ``mantissa`` and shared buffers.
    ``embed_scale`` (Gemma 3's scaled embedding) multiplies the rows as the original did.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: SEFPFormat, source: nn.Module | None = None,
                 padding_idx: int | None = None, embed_scale: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = num_embeddings, embedding_dim, fmt
        self.padding_idx, self.compute_dtype = padding_idx, dtype
        object.__setattr__(self, "source", source)
        if source is None:
            in_p = -(-embedding_dim // fmt.group_size) * fmt.group_size
            self.register_buffer("mantissa", torch.zeros(num_embeddings, in_p, dtype=torch.int8))
            self.register_buffer(fmt.shared_name, torch.zeros(
                num_embeddings, in_p // fmt.group_size, dtype=torch.int8 if fmt.scale == "pow2" else torch.float16))
        elif (source.out_features, source.in_features) != (num_embeddings, embedding_dim):
            raise OtaroError(f"a tied embedding {num_embeddings}x{embedding_dim} cannot read a "
                             f"{source.out_features}x{source.in_features} head")
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    @property
    def tied(self) -> bool:
        return self.source is not None

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            return self.source.mantissa, self.source.shared
        return self.mantissa, getattr(self, self.fmt.shared_name)

    @property
    def weight(self) -> torch.Tensor:
        """The float table, decoded (a full copy on each access: for code that reads an
        embedding's ``.weight``; the forward never builds it)."""
        return self.dequantized()

    def dequantized(self) -> torch.Tensor:
        """The whole table at the top precision (what the exporter traces)."""
        m, s = self.codes()
        return Q.sefp_dequantize(m, s, self.fmt.top_bits, self.fmt, self.embedding_dim, self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m, s = self.codes()
        flat = ids.reshape(-1)
        rows = Q.sefp_dequantize(m.index_select(0, flat), s.index_select(0, flat), self.fmt.top_bits, self.fmt,
                                 self.embedding_dim, self.compute_dtype)
        rows = rows.reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt.name}, " + \
            ("tied to the head" if self.tied else "own code")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _head_modules(model: nn.Module) -> tuple[str, nn.Module, str, nn.Module]:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or not isinstance(emb, nn.Embedding):
        raise OtaroError(f"this {model.config.model_type} model's head ({type(head).__name__}) or embedding "
                         f"({type(emb).__name__}) is not a plain Linear/Embedding: pass --head-bits float")
    names = _module_names(model)
    return names[id(head)], head, names[id(emb)], emb


def quantize_head(model: nn.Module, bits: int | None = DEFAULT_HEAD_BITS) -> nn.Module:
    """Store the head (at ``bits``) and the embedding as SEFP codes of the model's format, in
    place (round to nearest: GPTQ would need the final hidden states, and at 8 bits RTN's error
    is already small). ``bits=None`` does nothing. The model must be converted (packed) first."""
    from otaro.modules import SEFPLinear, attach, quant_layers

    if bits is None:
        return model
    info = getattr(model, "otaro", None)
    if info is None:
        raise OtaroError("quantize the model's linears first (convert), then its head")
    if info.head is not None:
        raise OtaroError("the model's head is already quantized")
    fmt = info.fmt
    if not isinstance(fmt, SEFPFormat):
        raise FormatError(f"--head-bits stores the head as SEFP; {fmt.name} models keep a float head "
                          f"(pass --head-bits float)")
    fmt.check_bits(bits)
    if any(not layer.packed for layer in quant_layers(model).values()):
        raise OtaroError("pack the model (master weights -> codes) before quantizing its head")
    head_name, head, emb_name, emb = _head_modules(model)
    tied = head.weight is emb.weight or (head.weight.data_ptr() == emb.weight.data_ptr()
                                         and head.weight.shape == emb.weight.shape)
    qhead = SEFPLinear.from_linear(head, fmt, packed=True, name=f"{head_name}.weight")
    qhead.set_bits(bits)
    _set_module(model, head_name, qhead)
    qemb = SEFPEmbedding(emb.num_embeddings, emb.embedding_dim, fmt, source=qhead if tied else None,
                         padding_idx=emb.padding_idx, embed_scale=getattr(emb, "embed_scale", None),
                         dtype=emb.weight.dtype).to(emb.weight.device)
    if not tied:
        m8, e = Q.sefp_encode(emb.weight.detach(), fmt, name=f"{emb_name}.weight")
        qemb.mantissa.copy_(m8)
        getattr(qemb, fmt.shared_name).copy_(e)
    _set_module(model, emb_name, qemb)
    head_info = HeadInfo(head_name, emb_name, tied, bits)
    attach(model, dataclasses.replace(info, layers=info.layers + (head_name,), head=head_info))
    return model


def install_head(model: nn.Module, head: HeadInfo, fmt: SEFPFormat, dtype: torch.dtype) -> None:
    """Checkpoint loading: put an (empty) SEFPEmbedding where ``head`` says; the head itself is
    built with the other layers from the manifest."""
    from otaro.modules import SEFPLinear

    try:
        qhead, emb = model.get_submodule(head.layer), model.get_submodule(head.embedding)
    except AttributeError:
        raise OtaroError(f"the head record names {head.layer!r}/{head.embedding!r}, which this model does not have") \
            from None
    if not isinstance(qhead, SEFPLinear) or not isinstance(emb, nn.Embedding):
        raise OtaroError(f"the head record's {head.layer!r} is not a quantized layer of the manifest, or "
                         f"{head.embedding!r} is not an embedding")
    qemb = SEFPEmbedding(emb.num_embeddings, emb.embedding_dim, fmt, source=qhead if head.tied else None,
                         padding_idx=emb.padding_idx, embed_scale=getattr(emb, "embed_scale", None), dtype=dtype)
    _set_module(model, head.embedding, qemb)
    qhead.set_bits(head.bits)
