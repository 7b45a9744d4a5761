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


from otaro.methods import rtn  # noqa: E402,F401  (registers)
