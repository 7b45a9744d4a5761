"""Triton forms of the format table's derivations, generated from the table itself.

Each rounding's derivation (``otaro.formats.table.derive_*``) is written once against an ``ops``
object; numpy, torch and ONNX each implement ``ops``. Here :class:`TritonSourceOps` implements it
*symbolically*: running ``fmt.derive`` on it yields a Triton expression string, and
:func:`generate_source` wraps one expression per rounding into a single ``@triton.jit`` dispatcher

    derive_magnitude(M, p, lim, ROUNDING: tl.constexpr)

whose ``ROUNDING`` branch is resolved at compile time (so a kernel specialised on one rounding
carries only that formula). Triton's JIT (and its CPU interpreter) reads a function's source with
``inspect``, so the generated module is compiled under a synthetic file name registered in
``linecache``; nothing is written to disk. This module itself does not import Triton
(:func:`load_generated` does), so the selection and fallback code can use its tables anywhere.

Integer semantics: Triton's ``//`` and ``%`` on integers truncate toward zero, which equals floor
division / floor modulo only for non-negative operands: exactly the contract of a derivation
(``floordiv`` operands >= 0; every ``mod`` here takes a quotient of non-negatives). ``M``, ``p``
and ``lim`` are int32; intermediate values stay below 2^10.
"""

from __future__ import annotations

import linecache
import textwrap
import types

from otaro.errors import FormatError
from otaro.formats.table import SEFP_ROUNDINGS, SEFPFormat

# Stable small integers naming each rounding inside kernels (a tl.constexpr).
ROUNDING_IDS: dict[str, int] = {name: i for i, name in enumerate(SEFP_ROUNDINGS)}

_FILENAME = "<otaro.kernels.derive generated>"


class TritonSourceOps:
    """``ops`` of a derivation that builds Triton expression text instead of computing.

    Every result is fully parenthesised so that the text composes without precedence rules."""

    @staticmethod
    def c(v: int) -> str:
        return f"({int(v)})"

    @staticmethod
    def add(a: str, b: str) -> str:
        return f"({a} + {b})"

    @staticmethod
    def mul(a: str, b: str) -> str:
        return f"({a} * {b})"

    @staticmethod
    def floordiv(a: str, b: str) -> str:
        return f"({a} // {b})"  # truncation == floor: operands are >= 0 by contract

    @staticmethod
    def mod(a: str, b: str) -> str:
        return f"({a} % {b})"

    @staticmethod
    def minimum(a: str, b: str) -> str:
        return f"tl.minimum({a}, {b})"


def derivation_expression(rounding: str) -> str:
    """The Triton expression of one rounding's derivation, in the names ``M``, ``p``, ``lim``."""
    if rounding not in SEFP_ROUNDINGS:
        raise FormatError(f"unknown SEFP rounding {rounding!r}: choose one of {sorted(SEFP_ROUNDINGS)}")
    return SEFP_ROUNDINGS[rounding].derive(TritonSourceOps, "M", "p", "lim")


def generate_source() -> str:
    """Source of the generated module: one ``@triton.jit`` dispatcher over every rounding."""
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        "def derive_magnitude(M, p, lim, ROUNDING: tl.constexpr):",
        '    """b-bit magnitude from the stored magnitude M (generated from otaro.formats.table)."""',
    ]
    for i, name in enumerate(SEFP_ROUNDINGS):
        keyword = "if" if i == 0 else "elif"
        lines += [f"    {keyword} ROUNDING == {ROUNDING_IDS[name]}:  # {name}",
                  f"        out = {derivation_expression(name)}"]
    # An unknown id cannot reach here (kernels take ids from ROUNDING_IDS), but Triton needs
    # ``out`` bound on every path.
    lines += ["    else:", "        out = M", "    return out", ""]
    return "\n".join(lines)


def _load(source: str) -> types.ModuleType:
    module = types.ModuleType("otaro.kernels._derive_generated")
    module.__file__ = _FILENAME
    # inspect.getsource (used by triton.jit and its interpreter) finds the text here.
    linecache.cache[_FILENAME] = (len(source), None, source.splitlines(keepends=True), _FILENAME)
    exec(compile(source, _FILENAME, "exec"), module.__dict__)
    return module


SOURCE = generate_source()
_generated: types.ModuleType | None = None


def load_generated() -> types.ModuleType:
    """The compiled generated module (imports triton: called by the kernel modules only, so that
    this module and the fallback path stay importable without Triton)."""
    global _generated
    if _generated is None:
        _generated = _load(SOURCE)
    return _generated


def rounding_id(fmt: SEFPFormat) -> int:
    """The ``ROUNDING`` constexpr of a format; every table rounding has one."""
    try:
        return ROUNDING_IDS[fmt.rounding]
    except KeyError:
        raise FormatError(f"{fmt.name}: rounding {fmt.rounding!r} has no Triton derivation") from None


def describe() -> str:
    """The generated source, for debugging (``python -c 'from otaro.kernels import derive; ...'``)."""
    return textwrap.dedent(SOURCE)

