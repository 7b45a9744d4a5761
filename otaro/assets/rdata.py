"""A small pure-Python reader for R's serialized objects and lazy-load databases.

Why: the Jane Austen texts we benchmark on ship as an R package (Debian ``r-cran-janeaustenr``)
whose data sit in a lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs). Installing R
to read ~4 MB of text is out of proportion, and the format is simple:

* ``.rdx`` is an R object saved with ``saveRDS`` (usually gzip; a 4-byte-length + zlib stream
  is accepted too): ``list(variables = list(<name> = c(offset, length), ...), references = ...,
  compressed = TRUE | 2 | 3)``.
* each ``.rdb`` entry at ``offset`` is ``length`` bytes: a 4-byte big-endian uncompressed length
  followed by a zlib stream (``compressed = TRUE``), or by a one-byte method tag and a zlib /
  bzip2 / xz / stored body (``compressed = 2 or 3``); inside is one serialized R object.
* the serialization is R's XDR binary format, version 2 or 3 (``X\\n`` header).

Only what data packages use is implemented: NULL, symbols, pairlists (attributes), character /
logical / integer / double / complex / raw vectors, lists, back-references, environments as
opaque placeholders, and the common ALTREP forms R >= 3.5 writes (compact sequences, wrappers,
deferred strings). Anything else raises ``ValueError`` naming the SEXP type, rather than
returning something half-decoded.

``unserialize`` returns raw objects (``RVector`` = list + ``attributes``); ``to_python``
turns factors into label lists, data frames and named lists into dicts, and everything else into
plain lists, which is what callers want.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
import struct
import zlib
from pathlib import Path

# SEXP type codes (R internals, Rinternals.h / serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
ALTREP_SXP, EMPTYENV_SXP, BASEENV_SXP = 238, 242, 241
GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 253, 254, 255
UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP = 252, 251, 250

_PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP}
_LIST_TYPES = {VECSXP, EXPRSXP, LISTSXP}
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_LATIN1, _UTF8, _BYTES, _ASCII = 1 << 2, 1 << 3, 1 << 1, 1 << 6
_NA_INTEGER = -(2**31)
_NA_REAL_LOW_WORD = 1954  # R's NA_real_ is the NaN whose low 32 bits are 1954


class RVector(list):
    """An R vector or list: the elements, plus R attributes (names, class, levels...)."""

    def __init__(self, items=(), attributes: dict | None = None, sexptype: int = VECSXP):
        super().__init__(items)
        self.attributes: dict = dict(attributes or {})
        self.sexptype = sexptype  # which R type it came from: lists and atomic vectors differ


class RSymbol(str):
    """An R symbol (a name), kept distinct from a character string."""


class REnvironment:
    """An R environment, kept only as an opaque placeholder (data never needs its contents)."""

    def __init__(self, kind: str = "env"):
        self.kind = kind
        self.frame: object = None

    def __repr__(self) -> str:
        return f"<R {self.kind}>"


class _Reader:
    """Cursor over one XDR serialization stream, with R's reference table."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []
        self.native_encoding = "utf-8"

    # -- primitives -----------------------------------------------------------------------
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated R serialization at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower halves
            upper, lower = self.int(), self.int()
            n = (upper << 32) + lower
        if n < 0:
            raise ValueError(f"negative vector length {n} in R serialization")
        return n

    def ints(self, n: int) -> list:
        return list(struct.unpack(f">{n}i", self.take(4 * n)))

    def doubles(self, n: int) -> list:
        return list(struct.unpack(f">{n}d", self.take(8 * n)))

    # -- header -----------------------------------------------------------------------------
    def header(self) -> None:
        magic = self.take(2)
        if magic != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {magic!r}, expected b'X\\n')")
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version to read it
        if version == 3:
            enc = self.take(self.int()).decode("ascii", "replace")
            self.native_encoding = _python_codec(enc)
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version} (need 2 or 3)")

    # -- items ------------------------------------------------------------------------------
    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        handler = _SPECIAL.get(kind)
        if handler is not None:
            return handler(self, flags)
        if kind in _PAIRLIST_TYPES:
            return self.pairlist(flags)
        reader = _VECTOR_READERS.get(kind)
        if reader is None:
            raise ValueError(f"unsupported R object type {kind} in serialization")
        value = reader(self, flags)
        if flags & _HAS_ATTR and isinstance(value, RVector):
            value.attributes.update(_attributes(self.item()))
        elif flags & _HAS_ATTR:
            self.item()  # attributes on a symbol-like value: read past them
        return value

    def pairlist(self, flags: int) -> RVector:
        """Read a chain of pairlist cells iteratively (long pairlists would overflow recursion)."""
        values, tags, attributes = [], [], {}
        while True:
            if flags & _HAS_ATTR:
                attributes.update(_attributes(self.item()))
            tags.append(str(self.item()) if flags & _HAS_TAG else "")
            values.append(self.item())
            flags = self.int()
            if (flags & 0xFF) not in _PAIRLIST_TYPES:
                self.pos -= 4
                rest = self.item()
                if rest is not None:  # dotted pair with a non-NULL tail: keep it as a last value
                    values.append(rest)
                    tags.append("")
                break
        out = RVector(values, attributes, LISTSXP)
        if any(tags):
            out.attributes["names"] = RVector(tags, sexptype=STRSXP)
        return out

    def charsxp(self, flags: int):
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = self.take(n)
        levels = flags >> 12
        if levels & _BYTES:
            return bytes(raw)
        if levels & _UTF8:
            return raw.decode("utf-8", "replace")
        if levels & _LATIN1:
            return raw.decode("latin-1")
        if levels & _ASCII:
            return raw.decode("ascii", "replace")
        try:
            return raw.decode(self.native_encoding)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")


def _python_codec(r_encoding: str) -> str:
    """Map R's native-encoding name (``UTF-8``, ``latin1``, ``ISO-8859-1``...) to a codec."""
    name = r_encoding.strip().lower()
    if name in {"latin1", "iso-8859-1", "iso8859-1"}:
        return "latin-1"
    return "utf-8"


def _attributes(pairlist) -> dict:
    """Turn an attribute pairlist into ``{name: value}``."""
    if pairlist is None:
        return {}
    names = pairlist.attributes.get("names", [""] * len(pairlist))
    return {str(name): value for name, value in zip(names, pairlist)}


def _read_ref(r: _Reader, flags: int):
    index = flags >> 8
    if index == 0:
        index = r.int()
    if not 1 <= index <= len(r.refs):
        raise ValueError(f"bad R back-reference {index} (table has {len(r.refs)} entries)")
    return r.refs[index - 1]


def _read_symbol(r: _Reader, flags: int) -> RSymbol:
    name = r.item()
    symbol = RSymbol("" if name is None else name)
    r.refs.append(symbol)
    return symbol


def _read_env(r: _Reader, flags: int) -> REnvironment:
    env = REnvironment()
    r.refs.append(env)  # registered before its contents, which may point back at it
    r.int()  # locked
    r.item()  # enclosure
    env.frame = r.item()
    r.item()  # hash table
    r.item()  # attributes
    return env


def _read_altrep(r: _Reader, flags: int):
    info, state, attr = r.item(), r.item(), r.item()
    cls = str(info[0]) if info else "?"
    decoder = _ALTREP_CLASSES.get(cls)
    if decoder is None:
        raise ValueError(f"unsupported ALTREP class {cls!r} in R serialization")
    value = decoder(state)
    value.attributes.update(_attributes(attr))
    return value


def _compact_seq(state, cast, sexptype) -> RVector:
    n, start, step = state[0], state[1], state[2]
    return RVector((cast(start + i * step) for i in range(int(n))), sexptype=sexptype)


def _wrapped(state) -> RVector:
    inner = state[0]
    return RVector(inner, inner.attributes, inner.sexptype)


def _deferred_string(state) -> RVector:
    arg = state[0]
    strings = (None if v is None else _format_number(v) for v in arg)
    return RVector(strings, sexptype=STRSXP)


def _format_number(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


_ALTREP_CLASSES = {
    "compact_intseq": lambda s: _compact_seq(s, int, INTSXP),
    "compact_realseq": lambda s: _compact_seq(s, float, REALSXP),
    "deferred_string": _deferred_string,
    **{
        f"wrap_{t}": _wrapped
        for t in ("integer", "real", "logical", "string", "complex", "raw", "list")
    },
}


def _read_ints(r: _Reader, flags: int) -> RVector:
    values = (None if v == _NA_INTEGER else v for v in r.ints(r.length()))
    return RVector(values, sexptype=INTSXP)


def _read_logicals(r: _Reader, flags: int) -> RVector:
    values = (None if v == _NA_INTEGER else bool(v) for v in r.ints(r.length()))
    return RVector(values, sexptype=LGLSXP)


def _is_na_real(x: float) -> bool:
    return math.isnan(x) and struct.unpack(">II", struct.pack(">d", x))[1] == _NA_REAL_LOW_WORD


def _read_reals(r: _Reader, flags: int) -> RVector:
    values = (None if _is_na_real(v) else v for v in r.doubles(r.length()))
    return RVector(values, sexptype=REALSXP)


def _read_complex(r: _Reader, flags: int) -> RVector:
    parts = r.doubles(2 * r.length())
    values = (complex(parts[i], parts[i + 1]) for i in range(0, len(parts), 2))
    return RVector(values, sexptype=CPLXSXP)


def _read_strings(r: _Reader, flags: int) -> RVector:
    n = r.length()
    out = RVector(sexptype=STRSXP)
    for _ in range(n):
        elem_flags = r.int()
        if elem_flags & 0xFF != CHARSXP:
            raise ValueError(f"character vector element of type {elem_flags & 0xFF}, not CHARSXP")
        out.append(r.charsxp(elem_flags))
    return out


def _read_list(r: _Reader, flags: int) -> RVector:
    return RVector((r.item() for _ in range(r.length())), sexptype=flags & 0xFF)


def _read_raw(r: _Reader, flags: int) -> RVector:
    return RVector(r.take(r.length()), sexptype=RAWSXP)


_VECTOR_READERS = {
    CHARSXP: lambda r, flags: r.charsxp(flags),
    LGLSXP: _read_logicals,
    INTSXP: _read_ints,
    REALSXP: _read_reals,
    CPLXSXP: _read_complex,
    STRSXP: _read_strings,
    VECSXP: _read_list,
    EXPRSXP: _read_list,
    RAWSXP: _read_raw,
}

_SPECIAL = {
    NILVALUE_SXP: lambda r, f: None,
    NILSXP: lambda r, f: None,
    REFSXP: _read_ref,
    SYMSXP: _read_symbol,
    ENVSXP: _read_env,
    ALTREP_SXP: _read_altrep,
    GLOBALENV_SXP: lambda r, f: REnvironment("globalenv"),
    EMPTYENV_SXP: lambda r, f: REnvironment("emptyenv"),
    BASEENV_SXP: lambda r, f: REnvironment("baseenv"),
    BASENAMESPACE_SXP: lambda r, f: REnvironment("base namespace"),
    UNBOUNDVALUE_SXP: lambda r, f: None,
    MISSINGARG_SXP: lambda r, f: None,
}


def unserialize(data: bytes):
    """Decode one R object from an uncompressed XDR serialization (``X\\n`` header)."""
    reader = _Reader(bytes(data))
    reader.header()
    try:
        return reader.item()
    except RecursionError:
        raise ValueError("R serialization nests too deeply to decode") from None


def to_python(obj):
    """Turn a decoded R object into plain Python: factor -> labels, named list -> dict.

    Data frames become ``{column: list}``; named lists become dicts; every other vector becomes
    a plain list (names of atomic vectors are dropped). NA is ``None``.
    """
    if not isinstance(obj, RVector):
        return obj
    attrs = obj.attributes
    classes = list(attrs.get("class") or [])
    if "factor" in classes:
        levels = list(attrs.get("levels") or [])
        return [None if code is None else levels[code - 1] for code in obj]
    names = attrs.get("names")
    if names is not None and obj.sexptype in _LIST_TYPES:
        return {str(name): to_python(value) for name, value in zip(names, obj)}
    return [to_python(v) for v in obj]


# -- files ------------------------------------------------------------------------------------
def _inflate_stream(blob: bytes) -> bytes:
    """Undo the compression around a whole serialized file (gzip/bzip2/xz, R-zlib, or none)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    if blob[:2] == b"X\n":
        return blob
    return _inflate_entry(blob, 1)


def _inflate_entry(blob: bytes, compressed) -> bytes:
    """Decompress one lazy-load entry: 4-byte big-endian length, [method byte], body."""
    if len(blob) < 5:
        raise ValueError("lazy-load entry shorter than its 4-byte length header")
    expected = struct.unpack(">I", blob[:4])[0]
    body, method = blob[4:], b"1"
    if compressed in (2, 3):
        method, body = blob[4:5], blob[5:]
    try:
        out = {
            b"1": zlib.decompress,
            b"2": bz2.decompress,
            b"Z": lzma.decompress,
            b"0": bytes,
        }[method](body)
    except KeyError:
        raise ValueError(f"unknown lazy-load compression method {method!r}") from None
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
        raise ValueError(f"corrupt compressed lazy-load entry: {exc}") from None
    if len(out) != expected:
        raise ValueError(f"lazy-load entry inflated to {len(out)} bytes, header says {expected}")
    return out


def read_rds(path: str | os.PathLike):
    """Read one serialized R object file (``.rds`` or ``.rdx``) as raw R objects."""
    blob = Path(path).read_bytes()
    try:
        data = _inflate_stream(blob)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ValueError(f"{path}: not a readable R data file ({exc})") from None
    return unserialize(data)


def _compression_of(index: dict) -> int:
    flag = index.get("compressed", [True])
    value = flag[0] if isinstance(flag, list) and flag else flag
    if value is True:
        return 1
    if value in (2, 3):
        return int(value)
    if value in (False, 0, None):
        return 0
    raise ValueError(f"unknown lazy-load compression flag {value!r}")


def read_lazyload_db(rdx_path: str | os.PathLike, names=None) -> dict:
    """Read variables from an R lazy-load database (``X.rdx`` + sibling ``X.rdb``).

    Returns ``{name: to_python(value)}`` for every variable, or only those in ``names``.
    Raises ``ValueError`` on a malformed index or entry, ``FileNotFoundError`` if missing.
    """
    rdx_path = Path(rdx_path)
    rdb_path = rdx_path.with_suffix(".rdb")
    index = to_python(read_rds(rdx_path))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError(f"{rdx_path}: not a lazy-load index (no 'variables' list)")  # noqa: TRY004
    compressed = _compression_of(index)
    variables = index["variables"]
    missing = sorted(set(names or ()) - set(variables))
    if missing:
        raise ValueError(f"{rdx_path}: no variable(s) {missing}; it has {sorted(variables)}")
    wanted = variables if names is None else {n: variables[n] for n in names}
    blob = rdb_path.read_bytes()
    out = {}
    for name, where in wanted.items():
        offset, size = int(where[0]), int(where[1])
        if offset < 0 or size <= 0 or offset + size > len(blob):
            raise ValueError(f"{rdb_path}: entry {name!r} at {offset}+{size} is out of range")
        raw = blob[offset : offset + size]
        data = raw if compressed == 0 else _inflate_entry(raw, compressed)
        out[name] = to_python(unserialize(data))
    return out
