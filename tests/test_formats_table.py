"""The format table: names, bits-per-weight arithmetic, validation messages, bit-width parsing."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from otaro.errors import FormatError
from otaro.formats import (
    ALL_BITS,
    CONTAINERS,
    DEFAULT_SEFP,
    FORMATS,
    GROUP_SIZES,
    SEFP_ROUNDINGS,
    FloatFormat,
    IntFormat,
    SEFPFormat,
    check_bits,
    check_group_size,
    container_for,
    format_bits,
    get_format,
    parse_bits,
    quantized_format_names,
)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_row_round_trips_by_name(name):
    row = get_format(name)
    assert row.name == name
    assert get_format(row) is row  # a row passes through unchanged
    if isinstance(row, SEFPFormat):
        assert SEFPFormat(group_size=row.group_size, rounding=row.rounding, scale=row.scale) == row
    elif isinstance(row, IntFormat):
        assert IntFormat(bits=row.bits, group_size=row.group_size, symmetric=row.symmetric) == row


def test_table_covers_every_registry_combination():
    sefp = {(f.group_size, f.rounding, f.scale) for f in FORMATS.values() if isinstance(f, SEFPFormat)}
    # legacy roundings (format v1, power-of-two scales only) decode old files
    assert sefp == {(g, r, k) for g in GROUP_SIZES for r, spec in SEFP_ROUNDINGS.items() for k in ("pow2", "fp16")
                    if k == "pow2" or not spec.legacy}
    ints = {(f.bits, f.group_size, f.symmetric) for f in FORMATS.values() if isinstance(f, IntFormat)}
    assert ints == {(b, g, s) for b in ALL_BITS for g in GROUP_SIZES for s in (True, False)}
    assert DEFAULT_SEFP in FORMATS
    offered = {n for n, f in FORMATS.items() if not isinstance(f, FloatFormat) and not n.endswith("-halfup")}
    assert set(quantized_format_names()) == offered


@pytest.mark.parametrize(
    "name, bits, bpw",
    [
        ("sefp-g64-trunc", 4, 4.125),
        ("sefp-g64-trunc", 2, 2.125),
        ("sefp-g16-nearest", 8, 8.5),
        ("sefp-g256-midpoint", 3, 3 + 8 / 256),
        ("int4-g128-asym", 4, 4 + 20 / 128),  # 4-bit zero point + fp16 scale per group
        ("int4-g128-sym", 4, 4 + 16 / 128),
        ("int2-g32-asym", 2, 2 + 18 / 32),
        ("int8-g64-sym", 8, 8 + 16 / 64),
        ("fp16", None, 16.0),
        ("bf16", None, 16.0),
        ("fp32", None, 32.0),
    ],
)
def test_bits_per_weight(name, bits, bpw):
    row = get_format(name)
    assert row.bits_per_weight(bits) == bpw


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if isinstance(f, SEFPFormat)])
def test_sefp_rows_arithmetic(name):
    fmt = get_format(name)
    assert fmt.bits == ALL_BITS
    for b in ALL_BITS:
        assert fmt.bits_per_weight(b) * fmt.group_size == fmt.storage_bits_per_group(b)
        spec = fmt.rounding_spec
        assert fmt.planes_read(b) == min(b + spec.extra_planes, 8)
        assert fmt.code_bits(b) == b + spec.extra_code_bits
        assert fmt.container_bits(b) == container_for(fmt.code_bits(b))
    # midpoint's 8-bit code is 9 bits wide (odd multiples of half a step): no container.
    assert (fmt.container_bits(8) is None) == (fmt.rounding == "midpoint")


def test_container_for():
    assert [container_for(b) for b in range(1, 10)] == [2, 2, 4, 4, 8, 8, 8, 8, None]
    assert CONTAINERS == (2, 4, 8)


def test_int_rows_ranges():
    for f in FORMATS.values():
        if isinstance(f, IntFormat):
            assert f.container_bits() == container_for(f.bits)
            if f.symmetric:
                assert (f.qmin, f.qmax) == (-(2 ** (f.bits - 1) - 1), 2 ** (f.bits - 1) - 1)
            else:
                assert (f.qmin, f.qmax) == (0, 2**f.bits - 1)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(FormatError, match=r"'sefp-g64-trunk'.*unknown SEFP rounding.*did you mean sefp-g64-trunc"):
        get_format("sefp-g64-trunk")
    with pytest.raises(FormatError, match="otaro formats"):
        get_format("totally-unknown")


@pytest.mark.parametrize("bad", [1, 9, 0, -4, 4.0, "4", True, None])
def test_bad_bits_raise_with_choices(bad):
    with pytest.raises(FormatError, match=r"bit-width .* not supported: choose one of 2-8"):
        check_bits(bad)
    with pytest.raises(FormatError):
        get_format("sefp-g64-trunc").bits_per_weight(bad)


def test_int_row_rejects_other_bit_widths():
    with pytest.raises(FormatError, match=r"int4-g128-asym .*4-bit|choose one of 4"):
        get_format("int4-g128-asym").bits_per_weight(3)
    with pytest.raises(FormatError):
        IntFormat(bits=9)


@pytest.mark.parametrize("bad, msg", [(48, "not a power of two"), (0, "not a power of two"),
                                      (8, "out of range"), (512, "out of range"), (64.0, "not a power of two")])
def test_bad_group_sizes(bad, msg):
    with pytest.raises(FormatError, match=msg):
        check_group_size(bad)
    with pytest.raises(FormatError, match=msg):
        SEFPFormat(group_size=bad)


def test_bad_sefp_parameters():
    with pytest.raises(FormatError, match=r"unknown SEFP rounding 'ceil'.*midpoint.*nearest.*trunc"):
        SEFPFormat(rounding="ceil")
    with pytest.raises(FormatError, match="stores 8-bit mantissas"):
        SEFPFormat(top_bits=6)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("2-8", (2, 3, 4, 5, 6, 7, 8)),
        ("2,3,4,8", (2, 3, 4, 8)),
        ("8,2, 4", (2, 4, 8)),
        ("4", (4,)),
        ("2-4,8", (2, 3, 4, 8)),
        ("3,3", (3,)),
        (4, (4,)),
        ([8, 2, 2], (2, 8)),
    ],
)
def test_parse_bits(spec, expected):
    assert parse_bits(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "2-", "8-2", "2..8", "2;3", "-", ","])
def test_parse_bits_rejects_unreadable(spec):
    with pytest.raises(FormatError, match="bit-widths"):
        parse_bits(spec)


@pytest.mark.parametrize("spec", ["1-8", "9", "2,10", 1])
def test_parse_bits_rejects_unsupported(spec):
    with pytest.raises(FormatError, match="not supported"):
        parse_bits(spec)


def test_parse_bits_respects_allowed():
    assert parse_bits("2-8", allowed=range(2, 9)) == ALL_BITS
    with pytest.raises(FormatError, match="choose one of 2,4,8"):
        parse_bits("3", allowed=(2, 4, 8))


def test_format_bits():
    assert format_bits(ALL_BITS) == "2-8"
    assert format_bits((8, 2, 4)) == "2,4,8"
    assert parse_bits(format_bits((2, 3, 4, 8))) == (2, 3, 4, 8)


def _load_test_module(name: str):
    # Loaded by path (tests/ is not a package); a private module name keeps pytest's copy apart.
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_meta_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_meta_every_sefp_rounding_is_exercised_by_the_codec_tests():
    """Adding a rounding to SEFP_ROUNDINGS must fail here until the codec tests know its
    reference quantizer and its error bound (the codec tests parametrize over the registry and
    look these up by name)."""
    codec = _load_test_module("test_sefp_codec")
    assert set(codec.REFERENCE_CODES) == set(SEFP_ROUNDINGS)
    assert set(codec.ERROR_BOUNDS) == set(SEFP_ROUNDINGS)
    assert set(codec.ROUNDINGS) == set(SEFP_ROUNDINGS)
    assert {f.rounding for f in codec.SEFP_ROWS} == set(SEFP_ROUNDINGS)
    pack = _load_test_module("test_pack")
    assert {f.rounding for f in pack.SEFP_ROWS} == set(SEFP_ROUNDINGS)
