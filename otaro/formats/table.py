"""The one table of number formats.

Every part of otaro (modules, methods, exporter, runtime, CLI choices, tests) reads formats from
here by name; no bare ``nbits=4`` travels between modules. Rows are frozen dataclasses, built
once at import and checked by ``_check_table`` (bits-per-weight arithmetic, names, ranges).

SEFP rows carry *all* derived bit-widths 2..8 (one stored model); integer rows carry one
bit-width (one model per precision, the "model zoo" the SEFP format avoids).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

from otaro.errors import FormatError

TOP_BITS = 8
MIN_BITS = 2
ALL_BITS: tuple[int, ...] = tuple(range(MIN_BITS, TOP_BITS + 1))
GROUP_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
# onnxruntime's MatMulNBits on CPU runs these containers (docs/FACTS.md); a b-bit code rides in the
# smallest one that holds it.
CONTAINERS: tuple[int, ...] = (2, 4, 8)
# All-zero groups store this exponent and all-zero mantissas (int8 minimum, never a real E
# because fp32 normals have E >= -126 and smaller groups are flushed to zero).
ZERO_GROUP_EXPONENT = -128


def check_bits(bits: int, allowed: Iterable[int] = ALL_BITS) -> int:
    allowed = tuple(allowed)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise FormatError(f"bit-width {bits!r} is not supported: choose one of {format_bits(allowed)}")
    return bits


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or (
        group_size & (group_size - 1)
    ):
        raise FormatError(f"group size {group_size!r} is not a power of two")
    if group_size not in GROUP_SIZES:
        raise FormatError(f"group size {group_size} is out of range: choose one of {list(GROUP_SIZES)}")
    return group_size


def format_bits(bits: Iterable[int]) -> str:
    bits = sorted(bits)
    if bits and bits == list(range(bits[0], bits[-1] + 1)) and len(bits) > 2:
        return f"{bits[0]}-{bits[-1]}"
    return ",".join(str(b) for b in bits)


def parse_bits(spec: str | int | Iterable[int], allowed: Iterable[int] = ALL_BITS) -> tuple[int, ...]:
    """Parse ``"2-8"``, ``"2,3,4,8"``, ``"4"`` or an iterable into a sorted tuple of bit-widths."""
    if isinstance(spec, int):
        return (check_bits(spec, allowed),)
    if not isinstance(spec, str):
        return tuple(sorted({check_bits(int(b), allowed) for b in spec}))
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise FormatError(f"cannot read bit-widths {spec!r}: use e.g. '2-8' or '2,3,4,8'") from None
    if not out:
        raise FormatError(f"no bit-widths in {spec!r}")
    return tuple(sorted(check_bits(b, allowed) for b in out))


def parse_bit_weights(spec: str | dict | Iterable, allowed: Iterable[int] = ALL_BITS) -> tuple[tuple[int, float], ...]:
    """Parse target bit-widths with optional weights λ_b: ``"3:1,4:1,8:2"``, ``"2-8"`` (all 1),
    ``"3,4,8:2"`` or a ``{bits: weight}`` mapping, into sorted ``((bits, weight), ...)``.

    The weights are relative (only their ratios matter); every weight must be > 0."""
    allowed = tuple(allowed)
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        items = [tuple(x) if isinstance(x, (list, tuple)) else (x, 1.0) for x in spec]
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            bits_part, _, weight_part = part.partition(":")
            try:
                weight = float(weight_part) if weight_part else 1.0
            except ValueError:
                raise FormatError(f"cannot read the weight in {part!r}: use e.g. '3:1,4:1,8:2'") from None
            items += [(b, weight) for b in parse_bits(bits_part, allowed)]
    out: dict[int, float] = {}
    for b, weight in items:
        b = check_bits(int(b), allowed)
        weight = float(weight)
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise FormatError(f"weight of {b}-bit must be a positive number (got {weight!r})")
        if b in out:
            raise FormatError(f"{b}-bit is listed twice in {spec!r}")
        out[b] = weight
    if not out:
        raise FormatError(f"no bit-widths in {spec!r}")
    return tuple(sorted(out.items()))


def container_for(bits: int) -> int | None:
    """Smallest MatMulNBits container holding a signed ``bits``-bit code; None if none does."""
    for c in CONTAINERS:
        if c >= bits:
            return c
    return None


# ---- Derivations: one definition each, read by every backend ---------------------------------
# A derivation maps the stored 8-bit magnitude M (0..127) to the b-bit magnitude, given
# p = 2^(8-b) and lim = 2^(b-1) - 1, using only the integer operations of an ``ops`` object:
# ``c(int)``, ``add``, ``mul``, ``floordiv`` (operands >= 0), ``mod``, ``minimum``. The numpy
# codec (otaro.formats.sefp), the torch twin (torch_ref) and the ONNX function builder
# (onnx_ops, which emits one node per call) each implement ``ops``, so the formula exists once.
# The sign is restored afterwards as sign(m8) * M_b (sign(0) = 0 keeps a stored zero at zero).


def derive_trunc(o, M, p, lim):
    """Truncation toward zero: drop the low 8-b magnitude bits (the paper's switch)."""
    return o.floordiv(M, p)


def derive_nearest_even(o, M, p, lim):
    """Round M/p to nearest, ties to even, saturating at lim.

    floor((2M + p - 1 + (floor(M/p) mod 2)) / 2p): below a tie the numerator stays under the
    next multiple of 2p, above it reaches it, and at a tie (2(M mod p) = p) the odd/even bit of
    floor(M/p) decides. p = 1 gives M back. Ties round to even so the error of a tie has no
    systematic direction (v1 rounded half up: +Δ8/4 on average at b = 7)."""
    two = o.c(2)
    num = o.add(o.add(o.mul(M, two), p), o.add(o.mod(o.floordiv(M, p), two), o.c(-1)))
    return o.minimum(o.floordiv(num, o.mul(p, two)), lim)


def derive_nearest_up(o, M, p, lim):
    """Format v1's ``nearest``: round half up on the first dropped bit (biased; kept so that
    checkpoints and artifacts written before format v2 decode exactly as they were made)."""
    two = o.c(2)
    return o.minimum(o.floordiv(o.add(o.mul(M, two), p), o.mul(p, two)), lim)


def derive_midpoint(o, M, p, lim):
    """The middle of the truncated cell, in half steps: 2·floor(M/p) + 1 (odd codes)."""
    return o.add(o.mul(o.floordiv(M, p), o.c(2)), o.c(1))


@dataclass(frozen=True)
class SEFPRounding:
    """How the stored 8-bit code is made and how a lower precision is derived from it."""

    name: str
    description: str
    # bit-planes read beyond b: nearest reads the bits below the cut; midpoint reads the
    # nonzero plane (otaro.formats.pack), because "is M8 > 0?" decides 0 vs ±Δ_b/2 when the
    # top b-1 magnitude bits are all zero and is not visible in the first b planes.
    extra_planes: int
    extra_code_bits: int  # extra bits the signed integer code needs (midpoint: odd multiples of Δ/2)
    exact_nesting: bool  # derived b-bit value == quantizing the float weight directly at b
    encoder: str  # how |w|/Δ8 becomes the stored magnitude: "rint" (half even) or "floor"
    derive: Callable = field(repr=False, compare=False)
    legacy: bool = False  # kept only to read old files; not offered for new models


SEFP_ENCODERS = ("rint", "floor")

SEFP_ROUNDINGS: dict[str, SEFPRounding] = {
    r.name: r
    for r in (
        SEFPRounding(
            "trunc",
            "8-bit code rounded to nearest; lower precisions truncate toward zero (the paper's switch)",
            extra_planes=0, extra_code_bits=0, exact_nesting=False, encoder="rint", derive=derive_trunc,
        ),
        SEFPRounding(
            "nearest",
            "8-bit code rounded to nearest; lower precisions round to nearest, ties to even",
            extra_planes=8, extra_code_bits=0, exact_nesting=False, encoder="rint", derive=derive_nearest_even,
        ),
        SEFPRounding(
            "midpoint",
            "truncated codes, decoded at the middle of their cell ((M+1/2)·Δ; zero stays zero)",
            extra_planes=1, extra_code_bits=1, exact_nesting=True, encoder="floor", derive=derive_midpoint,
        ),
        SEFPRounding(
            "halfup",
            "format v1's nearest (round half up on the first dropped bit; biased), for old files",
            extra_planes=1, extra_code_bits=0, exact_nesting=False, encoder="rint", derive=derive_nearest_up,
            legacy=True,
        ),
    )
}

# What a format-v1 file's rounding name means in this table (v1 ``trunc`` truncated its 8-bit
# code as well, but codes already stored decode the same way; only ``nearest`` changed).
V1_ROUNDINGS = {"trunc": "trunc", "nearest": "halfup", "midpoint": "midpoint"}

# Per-group shared scale: "pow2" stores an int8 exponent E (Δ8 = 2^(E-6), the paper's SEFP);
# "fp16" stores an fp16 scale Δ8 = fp16(max|w| / 127) ("ssfp"). Name prefix and bits per group.
SCALE_KINDS: dict[str, tuple[str, int]] = {"pow2": ("sefp", 8), "fp16": ("ssfp", 16)}


@dataclass(frozen=True)
class SEFPFormat:
    """Shared-scale floating point: one shared scale per group of G weights along the reduction
    axis (an int8 power-of-two exponent, or an fp16 scale for ``ssfp``), sign-magnitude codes
    stored at 8 bits, every lower precision derived from them."""

    group_size: int = 64
    rounding: str = "nearest"
    top_bits: int = TOP_BITS
    scale: str = "pow2"
    bits: tuple[int, ...] = ALL_BITS
    family: str = field(default="sefp", init=False)

    def __post_init__(self):
        check_group_size(self.group_size)
        if self.rounding not in SEFP_ROUNDINGS:
            raise FormatError(f"unknown SEFP rounding {self.rounding!r}: choose one of {sorted(SEFP_ROUNDINGS)}")
        if self.scale not in SCALE_KINDS:
            raise FormatError(f"unknown shared-scale kind {self.scale!r}: choose one of {sorted(SCALE_KINDS)}")
        if self.top_bits != TOP_BITS:
            raise FormatError(f"SEFP stores {TOP_BITS}-bit mantissas (got top_bits={self.top_bits})")

    @property
    def name(self) -> str:
        return f"{SCALE_KINDS[self.scale][0]}-g{self.group_size}-{self.rounding}"

    @property
    def exponent_bits(self) -> int:
        """Bits of the per-group shared value (8 for an exponent, 16 for an fp16 scale)."""
        return SCALE_KINDS[self.scale][1]

    @property
    def shared_name(self) -> str:
        """Name of the per-group tensor in modules and checkpoints."""
        return "exponent" if self.scale == "pow2" else "scale"

    @property
    def derive(self) -> Callable:
        return self.rounding_spec.derive

    @property
    def rounding_spec(self) -> SEFPRounding:
        return SEFP_ROUNDINGS[self.rounding]

    def check_bits(self, bits: int) -> int:
        return check_bits(bits, self.bits)

    def bits_per_weight(self, bits: int) -> float:
        """Storage cost of a fixed-precision copy at ``bits`` (mantissa planes + exponents)."""
        self.check_bits(bits)
        return bits + self.exponent_bits / self.group_size

    def storage_bits_per_group(self, bits: int) -> int:
        return bits * self.group_size + self.exponent_bits

    def planes_read(self, bits: int) -> int:
        """Bit-planes (sign included) a bit-plane kernel reads at ``bits``."""
        self.check_bits(bits)
        return min(bits + self.rounding_spec.extra_planes, self.top_bits)

    def code_bits(self, bits: int) -> int:
        """Width of the signed integer code the derived weight is an integer multiple of."""
        self.check_bits(bits)
        return bits + self.rounding_spec.extra_code_bits

    def container_bits(self, bits: int) -> int | None:
        """MatMulNBits container (2/4/8) that holds the signed code exactly, or None (midpoint
        at 8 bits needs a 9-bit code: such a precision runs through a dequantized float path)."""
        return container_for(self.code_bits(bits))


@dataclass(frozen=True)
class IntFormat:
    """Integer b-bit weights with a scale (and a zero point if asymmetric) per group of G."""

    bits: int
    group_size: int = 128
    symmetric: bool = False
    scale_bits: int = 16  # scales are stored as fp16 in deployment layouts
    family: str = field(default="int", init=False)

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"

    @property
    def zero_bits(self) -> int:
        # Zero points are packed at the weight bit-width (GPTQ / MatMulNBits layout).
        return 0 if self.symmetric else self.bits

    def check_bits(self, bits: int) -> int:
        if bits != self.bits:
            raise FormatError(
                f"{self.name} holds {self.bits}-bit weights only (asked for {bits!r}); only SEFP models switch precision"
            )
        return bits

    def bits_per_weight(self, bits: int | None = None) -> float:
        if bits is not None:
            self.check_bits(bits)
        return self.bits + (self.scale_bits + self.zero_bits) / self.group_size

    def storage_bits_per_group(self, bits: int | None = None) -> int:
        return self.bits * self.group_size + self.scale_bits + self.zero_bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def container_bits(self, bits: int | None = None) -> int | None:
        return container_for(self.bits)


@dataclass(frozen=True)
class FloatFormat:
    """Unquantized weights (the baseline rows)."""

    name: str
    storage_bits: int
    family: str = field(default="float", init=False)

    def bits_per_weight(self, bits: int | None = None) -> float:
        return float(self.storage_bits)

    def storage_bits_per_group(self, bits: int | None = None) -> int:
        return self.storage_bits


Format = Union[SEFPFormat, IntFormat, FloatFormat]


def _build_table() -> dict[str, Format]:
    rows: list[Format] = [FloatFormat("fp32", 32), FloatFormat("fp16", 16), FloatFormat("bf16", 16)]
    # Legacy roundings exist only to read format-v1 files, which all had power-of-two scales.
    rows += [SEFPFormat(group_size=g, rounding=r, scale=k) for k in SCALE_KINDS for r in SEFP_ROUNDINGS
             for g in GROUP_SIZES if k == "pow2" or not SEFP_ROUNDINGS[r].legacy]
    rows += [
        IntFormat(bits=b, group_size=g, symmetric=s) for s in (True, False) for b in ALL_BITS for g in GROUP_SIZES
    ]
    return {row.name: row for row in rows}


FORMATS: dict[str, Format] = _build_table()
# The row that measured best on SmolLM2 (benchmarks/quality.py, RESULTS.md "quality"): lowest
# KLD at b = 3 and 4 among the RTN rows, b = 8 KLD 0.001; the paper's sefp-g64-trunc stays a row.
DEFAULT_SEFP = "ssfp-g64-nearest"


def _check_table(table: dict[str, Format]) -> None:
    """Import-time checks: a wrong row must fail loudly, not skew a benchmark."""
    seen = set()
    for name, row in table.items():
        assert name == row.name and name not in seen, f"format name clash: {name}"
        seen.add(name)
        if isinstance(row, SEFPFormat):
            for b in row.bits:
                bpw = row.bits_per_weight(b)
                # bits per weight times G must be the exact bit count of one stored group
                assert bpw * row.group_size == row.storage_bits_per_group(b), name
                assert b < bpw <= b + 1, f"{name}: shared-scale overhead out of range at b={b}"
                c = row.container_bits(b)
                assert row.code_bits(b) >= b and (c is None or c >= row.code_bits(b)), name
                assert row.planes_read(b) <= row.top_bits, name
        elif isinstance(row, IntFormat):
            bpw = row.bits_per_weight()
            assert bpw * row.group_size == row.storage_bits_per_group(), name
            assert row.qmax - row.qmin + 1 == 2**row.bits - (1 if row.symmetric else 0), name
        else:
            assert row.bits_per_weight() == row.storage_bits, name


_check_table(FORMATS)


_NAME_PATTERNS = (
    (re.compile(r"(sefp|ssfp)-g(\d+)-(\w+)"),
     lambda m: SEFPFormat(group_size=int(m[2]), rounding=m[3], scale="pow2" if m[1] == "sefp" else "fp16")),
    (re.compile(r"int(\d+)-g(\d+)-(sym|asym)"),
     lambda m: IntFormat(bits=int(m[1]), group_size=int(m[2]), symmetric=m[3] == "sym")),
)


def get_format(name: str | Format) -> Format:
    if not isinstance(name, str):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        # A well-formed name with a bad parameter gets the parameter's own message
        # ("group size 48 is not a power of two") rather than a bare "unknown format".
        close = difflib.get_close_matches(name, FORMATS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        for pattern, build in _NAME_PATTERNS:
            m = pattern.fullmatch(name)
            if m:
                try:
                    build(m)
                except FormatError as e:
                    raise FormatError(f"format {name!r}: {e}{hint}") from None
        raise FormatError(f"unknown format {name!r}{hint}; `otaro formats` lists them") from None


def is_legacy(fmt: Format) -> bool:
    return isinstance(fmt, SEFPFormat) and fmt.rounding_spec.legacy


def quantized_format_names() -> list[str]:
    """Formats offered for new models (legacy rows only decode old files)."""
    return [n for n, f in FORMATS.items() if f.family != "float" and not is_legacy(f)]
