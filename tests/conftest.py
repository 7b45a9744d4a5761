import os

import pytest

# The user's real cache (for opt-in slow tests), captured before any fixture replaces it.
REAL_CACHE = os.environ.get("OTARO_CACHE")

# Under pytest-xdist (make test runs one worker per core) each worker gets its share of the
# cores: torch's and OpenMP's default of one thread per core in every worker oversubscribes the
# machine, which made some tests several times slower on 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# Triton kernels run in its CPU interpreter in the tests. Triton reads the switch when a kernel is
# decorated, so it must be on before anything imports triton in this process (torch does, and
# tests importing every otaro module do): a kernel decorated without it, calling a helper
# decorated with it, fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
# TRITON_INTERPRET=0 in the environment keeps real kernels (on a GPU machine).
os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests must never reach a hub, and must not depend on a user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run slow / real-model tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point the asset cache at an empty folder unless a test opts in to the real one."""
    monkeypatch.setenv("OTARO_CACHE", str(tmp_path_factory.getbasetemp() / "otaro-cache"))


@pytest.fixture
def real_cache(monkeypatch):
    """Opt back in to the real asset cache (slow real-model tests)."""
    if REAL_CACHE is None:
        monkeypatch.delenv("OTARO_CACHE", raising=False)
    else:
        monkeypatch.setenv("OTARO_CACHE", REAL_CACHE)


@pytest.fixture
def text_file(tmp_path):
    from otaro.arch.tiny import SAMPLE_TEXT

    p = tmp_path / "sample.txt"
    p.write_text(SAMPLE_TEXT * 12, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny llama with varied weights (std 0.15) saved as a Hugging Face folder."""
    from otaro.arch.tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_model("llama", init_std=0.15).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
