"""`otaro run`: one-shot and interactive generation on a tiny artifact."""

import pytest
from click.testing import CliRunner

from otaro import checkpoint
from otaro.arch.tiny import tiny_model, tiny_tokenizer
from otaro.cli import cli
from otaro.export.artifact import ExportConfig, export
from otaro.modules import convert
from otaro.runtime import Runtime


@pytest.fixture(scope="session")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-cli")
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    checkpoint.save(convert(tiny_model("llama", init_std=0.15), "sefp-g16-trunc"), root / "ck", tokenizer=tok)
    export(ExportConfig(root / "ck", root / "art", accuracy_level=1, validate=False))
    return root / "art"


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_one_shot_streams_text_and_reports_speed_and_precision(art):
    res = invoke("run", art, "--bits", 4, "--prompt", "The quick brown fox", "--max-new-tokens", 8)
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.output and "precision 4" in res.output and "8 tokens" in res.output
    want = Runtime.load(art, bits=4).generate("The quick brown fox", max_new_tokens=8).text
    assert want in res.stdout  # the text itself goes to stdout, the rest to stderr
    assert "tokens/s" not in res.stdout
    res = invoke("run", art, "--bits", "*=3,layers.0.*=8", "--prompt", "Hi", "--chat", "--temperature", 0.7,
                 "--seed", 1, "--top-k", 20, "--top-p", 0.9, "--threads", 1, "--accuracy-level", 4,
                 "--max-new-tokens", 3)
    assert res.exit_code == 0, res.output
    assert "precision *=3,layers.0.*=8" in res.output


def test_interactive_session_switches_precision(art):
    res = invoke("run", art, "--max-new-tokens", 4,
                 input="/bits 3\nThe quick brown fox\n/bits\n/bits 9\n/nope\nA model\n/bits 3\n/quit\nnot read\n")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "precision 3 (switched in" in out and "derive+pack" in out
    assert out.count("precision 3, finish") == 2  # both prompts ran at 3 bits, after the bad lines
    assert "error: bit-width 9 is not supported" in out and "unknown command /nope" in out
    assert "precision 3 (warm" in out  # the second /bits 3 was already active


def test_one_shot_leaves_the_weights_on_small_pages(art, monkeypatch):
    """A one-shot run is over before moving its weights to huge pages would pay: it skips it;
    an interactive session moves them in the background while the user types."""
    asked = []
    load = Runtime.load.__func__

    def spy(cls, *a, **k):
        asked.append(k["huge_pages"])
        return load(cls, *a, **k)

    monkeypatch.setattr(Runtime, "load", classmethod(spy))
    assert invoke("run", art, "--prompt", "Hi", "--max-new-tokens", 2).exit_code == 0
    assert invoke("run", art, "--max-new-tokens", 2, input="Hi\n/quit\n").exit_code == 0
    assert asked == [False, True]


def test_bad_artifact_is_one_line(tmp_path, art):
    res = invoke("run", tmp_path / "missing", "--prompt", "x")
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output
    res = invoke("run", art, "--bits", "four", "--prompt", "x")
    assert res.exit_code == 1 and "cannot read precision" in res.output
    res = invoke("run", art, "--device", "cuda", "--prompt", "x")
    assert res.exit_code == 1 and "CUDAExecutionProvider" in res.output


def test_warm_precisions_switch_from_the_cache(art):
    res = invoke("run", art, "--warm", 3, "--warm", "*=2,layers.0.*=8", "--max-new-tokens", 2,
                 input="/bits 3\nHi\n/quit\n")
    assert res.exit_code == 0, res.output
    assert "precision 3 (warm" in res.output  # built at load: the switch was a cache lookup
    res = invoke("run", art, "--warm", 9, "--prompt", "Hi")
    assert res.exit_code != 0 and "Traceback" not in res.output and "9" in res.output
