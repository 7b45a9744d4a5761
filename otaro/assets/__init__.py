"""Offline benchmark assets: a real model and real text, prepared once into a local cache.

Nothing here is needed by unit tests; benchmarks call ``load_corpus`` / ``resolve_model_alias``
and get a clear ``AssetUnavailable`` (an ``OtaroError``) when a package or tool is missing.
Run ``python benchmarks/prepare_assets.py`` to fill the cache ahead of time. Importing this
package does not import torch or transformers.
"""

from otaro.assets.cache import AssetUnavailable, cache_dir
from otaro.assets.corpora import corpus_names, load_corpus, prepare_corpus
from otaro.assets.models import model_aliases, prepare_model, resolve_model_alias

__all__ = [
    "AssetUnavailable",
    "cache_dir",
    "corpus_names",
    "load_corpus",
    "model_aliases",
    "prepare_corpus",
    "prepare_model",
    "resolve_model_alias",
]
