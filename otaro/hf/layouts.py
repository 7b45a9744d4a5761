"""The registry of Hugging Face quantized-folder layouts, and the per-layer data they exchange.

A *layout* is how one quantized linear's integer codes, scales and zero points are laid out as
tensors in a Hugging Face folder (GPTQ v1, AWQ GEMM), plus the ``quantization_config`` the
ecosystem reads to pick its loader. Each layout module registers one :class:`Layout` here;
the writer and the reader only ever look layouts up (by name, by the method that made a
checkpoint, or by the ``quant_method`` of a folder's config), never branch on them.

Which layout a checkpoint is written in is decided by its method (``METHOD_LAYOUTS``: rtn and
gptq → GPTQ, awq → AWQ); the Python API (``otaro.hf.save(..., layout=...)``) may name one
explicitly. The real method is always recorded in the folder (``quantization_config.meta.otaro``)
whatever the layout says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from otaro.errors import CheckpointError, FormatError, OtaroError
from otaro.formats import IntFormat


@dataclass(frozen=True)
class LayerCodes:
    """One quantized linear in layout-neutral form (``N`` = out_features, ``K`` = in_features).

    codes  uint8 [N, K]       unsigned codes (a symmetric format's code q is stored q + 2^(b-1))
    zeros  uint8 [N, groups]  the true zero points (no v1 offset), 2^(b-1) for symmetric formats
    scales float32 [N, groups] fp16-representable
    g_idx  int32 [K]          group of each input column (column // G unless act-order permuted it)
    """

    codes: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])


def plain_g_idx(in_features: int, group_size: int) -> np.ndarray:
    return (np.arange(in_features, dtype=np.int32) // group_size).astype(np.int32)


@dataclass(frozen=True)
class Layout:
    """One Hugging Face layout. ``pack``/``unpack`` are exact inverses on valid data."""

    name: str  # registry key ("gptq", "awq")
    quant_method: str  # quantization_config.quant_method it writes and reads
    description: str
    bits: tuple[int, ...]  # weight bit-widths the layout can hold
    # check_format(fmt) -> None; check_shape(layer, in_features, out_features, fmt) -> None
    check_format: Callable[[IntFormat], None]
    check_shape: Callable[[str, int, int, IntFormat], None]
    # pack(LayerCodes) -> {suffix: array}; unpack({suffix: array}, qcfg, bits, group_size) -> LayerCodes
    pack: Callable[[LayerCodes], dict[str, np.ndarray]]
    unpack: Callable[[Mapping[str, np.ndarray], dict, int, int], LayerCodes]
    # (in_features, out_features) of a layer from its tensor shapes (without reading data)
    shape_of: Callable[[Mapping[str, tuple[int, ...]], int], tuple[int, int]]
    suffixes: tuple[str, ...]  # tensors per quantized linear (all required except those in optional)
    optional: tuple[str, ...]
    # quantization_config(fmt, method_record) -> dict (meta added by the writer)
    quantization_config: Callable[[IntFormat, dict], dict]
    # read_config(qcfg) -> (bits, group_size); raises CheckpointError on a variant it does not read
    read_config: Callable[[dict], tuple[int, int]]
    # extra JSON files beside config.json: {file name: content} from the final quantization_config
    side_files: Callable[[dict], dict[str, dict]] = lambda qcfg: {}


LAYOUTS: dict[str, Layout] = {}
# The layout a checkpoint made by a method is written in (a method absent here cannot be saved
# as a Hugging Face folder until it says which layout its ecosystem reads).
# The multi-task variants write the same IntLinear codes as the method they extend.
# Block reconstruction, LSI and QSLAW leave RTN's integer layout (codes, fp16 scales, integer zero
# points, no activation scales), which GPTQ v1 holds as it holds RTN.
METHOD_LAYOUTS: dict[str, str] = {"rtn": "gptq", "gptq": "gptq", "awq": "awq",
                                  "mlgptq": "gptq", "gptq-pooled": "gptq", "mlawq": "awq", "awq-pooled": "awq",
                                  "sb": "gptq", "la": "gptq", "mb": "gptq", "lsi": "gptq", "qslaw": "gptq"}


def register_layout(layout: Layout) -> Layout:
    if layout.name in LAYOUTS:
        raise ValueError(f"Hugging Face layout {layout.name!r} registered twice")
    if any(l.quant_method == layout.quant_method for l in LAYOUTS.values()):
        raise ValueError(f"quant_method {layout.quant_method!r} already has a layout")
    LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise OtaroError(f"unknown Hugging Face layout {name!r}; available: {', '.join(LAYOUTS)}") from None


def layout_for_method(method: str | None) -> Layout:
    """The layout a checkpoint of ``method`` is saved in (no method recorded: RTN's, a plain convert)."""
    name = METHOD_LAYOUTS.get(method or "rtn")
    if name is None:
        known = ", ".join(f"{m} -> {l}" for m, l in METHOD_LAYOUTS.items())
        raise OtaroError(f"method {method!r} has no Hugging Face layout ({known}); save it with --save-format otaro")
    return get_layout(name)


def layout_for_config(qcfg: dict, where: str) -> Layout:
    """The layout that reads a folder whose config has this ``quantization_config``."""
    method = str(qcfg.get("quant_method", "")).lower()
    for layout in LAYOUTS.values():
        if layout.quant_method == method:
            return layout
    have = ", ".join(l.quant_method for l in LAYOUTS.values())
    raise CheckpointError(f"{where}: quant_method {method!r} is not a layout otaro reads ({have})")


def check_format(layout: Layout, fmt) -> IntFormat:
    """``fmt`` is an integer format this layout can hold (one clear line otherwise)."""
    if not isinstance(fmt, IntFormat):
        raise FormatError(f"Hugging Face {layout.name.upper()} folders hold integer formats; {fmt.name} is "
                          f"{fmt.family} (save it with --save-format otaro)")
    if fmt.bits not in layout.bits:
        raise FormatError(f"the {layout.name.upper()} layout holds {'/'.join(map(str, layout.bits))}-bit weights "
                          f"only; {fmt.name} has {fmt.bits}")
    layout.check_format(fmt)
    return fmt


__all__ = ["LayerCodes", "Layout", "LAYOUTS", "METHOD_LAYOUTS", "register_layout", "get_layout",
           "layout_for_method", "layout_for_config", "check_format", "plain_g_idx"]
