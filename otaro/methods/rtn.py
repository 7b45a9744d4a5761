"""Round-to-nearest (for int formats) / direct encoding (for SEFP): no calibration data."""

from __future__ import annotations

from otaro.methods import Method, register_method
from otaro.modules import convert


def run_rtn(model, fmt, config, calibration=None, progress=None):
    return convert(model, fmt, packed=True, progress=progress)


register_method(
    Method(
        "rtn",
        "round-to-nearest int / direct SEFP encoding of each weight, no calibration",
        families=("sefp", "int"),
        needs_calibration=False,
        run=run_rtn,
    )
)
