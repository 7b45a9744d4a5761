"""Number formats: the format table and the numpy reference codecs (torch-free).

The torch twins live in :mod:`otaro.formats.torch_ref` (imported lazily so that the runtime
can use this package without torch).
"""

from otaro.formats.table import (  # noqa: F401
    ALL_BITS,
    CONTAINERS,
    DEFAULT_SEFP,
    FORMATS,
    GROUP_SIZES,
    SEFP_ROUNDINGS,
    TOP_BITS,
    ZERO_GROUP_EXPONENT,
    FloatFormat,
    Format,
    IntFormat,
    SEFPFormat,
    check_bits,
    check_group_size,
    container_for,
    format_bits,
    get_format,
    parse_bit_weights,
    parse_bits,
    quantized_format_names,
)
