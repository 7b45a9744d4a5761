"""Quantization methods (registry). RTN today; GPTQ, AWQ, MLGPTQ/MLAWQ, block reconstruction,
LSI and QSLAW plug in here with their own ``Method`` rows and reuse the same driver, modules and
checkpoint layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from otaro.errors import OtaroError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    families: tuple[str, ...]  # format families the method can produce
    needs_calibration: bool
    # run(model, fmt, config, calibration_batches, progress) -> model converted in place
    run: Callable
    # Whether the method optimises for target bit-widths (--bits with weights λ_b): multi-bit
    # SEFP selection does, with or without calibration data.
    target_bits: bool = False
    # Multi-task methods (mlgptq, mlawq, ...): calibration data comes per task with its LoRA
    # adapter (QuantizeConfig.tasks, --task NAME=ADAPTER:DATA) instead of --calib.
    multi_task: bool = False
    # after_save(model, checkpoint folder): extra outputs written next to the checkpoint
    # (the multi-task AWQ methods write the rescaled adapters there).
    after_save: Callable | None = None
    # read_data(source, config) -> what run() gets as its calibration argument, for methods that
    # read their own data (qslaw: task + generic text); called after the model loads, before run.
    read_data: Callable | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise OtaroError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


from otaro.methods import gptq, int_quantizer, rtn, sefp_quantizer  # noqa: E402,F401  (registers)
from otaro.methods import awq, multitask  # noqa: E402,F401  (registers)
from otaro.methods import qslaw  # noqa: E402,F401  (registers)
from otaro.methods import lsi, recon  # noqa: E402,F401  (registers sb, la, mb, lsi)
