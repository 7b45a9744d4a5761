"""Opt-in checks on the real benchmark model (``make test-all``; skipped when not prepared)."""

import pytest
import torch

from otaro.errors import OtaroError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        from otaro.sources import load_source

        return load_source("smollm2-135m")
    except OtaroError as e:
        pytest.skip(f"SmolLM2 not available: {e}")


@pytest.fixture(scope="module")
def brown_windows(smollm2):
    from otaro.assets.corpora import load_corpus
    from otaro.evaluation.data import make_windows

    try:
        text = load_corpus("brown-eval")
    except OtaroError as e:
        pytest.skip(f"Brown corpus not available: {e}")
    return make_windows(smollm2.tokenizer, text, 256, 4, "brown-eval")


def test_sefp8_is_close_to_fp32_and_quality_falls_with_bits(real_cache, smollm2, brown_windows, tmp_path):
    import copy

    from otaro import checkpoint
    from otaro.evaluation.metrics import score
    from otaro.modules import convert

    fp = score(smollm2.model, brown_windows).ppl
    model = convert(copy.deepcopy(smollm2.model), "sefp-g64-nearest")
    ppl = {}
    for b in (3, 5, 8):
        model.set_precision(b)
        ppl[b] = score(model, brown_windows).ppl
    # 8-bit SEFP with rounding: relative weight error ~0.8%; measured perplexity moves ~1%
    assert ppl[8] == pytest.approx(fp, rel=0.05)
    assert ppl[3] > ppl[5] > fp * 0.97
    checkpoint.save(model, tmp_path / "ck", tokenizer=smollm2.tokenizer)
    loaded = checkpoint.load(tmp_path / "ck", bits=5)
    assert score(loaded, brown_windows).ppl == ppl[5]
