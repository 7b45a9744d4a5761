"""The first hour with the tools: defaults that fit the model, progress visible in logs, an
up-front time/memory line before fine-tuning, and the Makefile/README telling the truth."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from otaro.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_fit_seq_len_caps_the_default_at_the_model_positions():
    from types import SimpleNamespace

    from otaro.sources import DEFAULT_SEQ_LEN, fit_seq_len

    assert fit_seq_len(None, SimpleNamespace(max_position_embeddings=256)) == 256
    assert fit_seq_len(None, SimpleNamespace(max_position_embeddings=8192)) == DEFAULT_SEQ_LEN
    assert fit_seq_len(None, SimpleNamespace()) == DEFAULT_SEQ_LEN
    assert fit_seq_len(64, SimpleNamespace(max_position_embeddings=256)) == 64  # the user's value wins


def test_eval_defaults_work_on_a_tiny_model(tmp_path, text_file):
    # tiny models allow 256 positions; the old fixed default of 512 failed on them
    res = CliRunner().invoke(cli, ["eval", "tiny-llama", "--text", str(text_file), "--bits", "8",
                                   "--format", "sefp-g64-trunc", "--max-windows", "1", "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert data["config"]["seq_len"] == 256  # recorded as used, not as None


def test_log_progress_prints_lines_with_eta_and_no_carriage_returns():
    from otaro.progress import LogProgress

    buf = io.StringIO()
    with LogProgress(total=4, desc="eval", unit="win", file=buf, interval=0) as bar:
        for _ in range(4):
            bar.set_postfix_str("int4 b=4")
            bar.update(1)
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert len(lines) == 4  # one per update at interval 0; close does not repeat the last one
    assert lines[0].startswith("eval: 1/4 win (25%)") and "ETA" in lines[0] and lines[0].endswith("[int4 b=4]")
    assert lines[-1].startswith("eval: 4/4 win (100%)") and "ETA" not in lines[-1]


def test_log_progress_respects_the_interval():
    from otaro.progress import LogProgress

    buf = io.StringIO()
    with LogProgress(total=1000, desc="x", file=buf, interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]  # only the final line
    assert buf.getvalue().startswith("x: 1000/1000")


def test_progress_picks_plain_lines_when_stderr_is_not_a_tty(monkeypatch):
    from otaro import progress as p

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(p.progress(total=3, desc="d"), p.LogProgress)
    bar = p.progress(total=3, desc="d", enabled=False)
    assert not isinstance(bar, p.LogProgress) and bar.disable


def test_time_estimate_scales_with_the_work():
    from otaro.arch.tiny import tiny_model
    from otaro.training.estimate import estimate_time, human_seconds

    model = tiny_model("llama")
    a = estimate_time(model, steps=10, batch_size=2, seq_len=64)
    b = estimate_time(model, steps=10, batch_size=4, seq_len=64, distill=True)
    assert a.flops_per_step > 0 and a.matmul_flops_per_s > 0
    assert b.flops_per_step > 2 * a.flops_per_step  # twice the tokens, plus the teacher's forward
    assert a.total_seconds == pytest.approx(10 * a.seconds_per_step)
    assert human_seconds(0.2) == "<1 s" and human_seconds(30) == "30 s" and human_seconds(600) == "10 min"
    assert human_seconds(7200) == "2.0 h"
    assert a.quantize_seconds_per_step == 0.0  # a float model fake-quantizes nothing
    from otaro.modules import convert

    q = estimate_time(convert(tiny_model("llama"), "ssfp-g64-nearest", packed=False), steps=10, batch_size=2,
                      seq_len=64)
    assert q.quantize_seconds_per_step > 0  # measured on the model's own largest layer
    assert q.seconds_per_step > q.quantize_seconds_per_step


def test_finetune_prints_its_plan_and_fits_the_tiny_model(tmp_path, monkeypatch):
    from otaro.arch.tiny import SAMPLE_TEXT

    monkeypatch.setenv("OTARO_PROGRESS_SECONDS", "0")
    text_file = tmp_path / "data.txt"
    text_file.write_text(SAMPLE_TEXT * 80, encoding="utf-8")  # enough for held-out blocks of 256
    out = tmp_path / "ft"
    res = CliRunner().invoke(cli, ["finetune", "tiny-llama", "--data", str(text_file), "-o", str(out), "--steps", "2",
                                   "--batch-size", "2", "--eval-every", "2", "--bits", "4,8"])
    assert res.exit_code == 0, res.output
    assert re.search(r"finetune: 2 steps x 2 x 256 tokens .* peak memory ~[\d.]+ GiB .* time ~", res.output)
    assert "finetune: step 1 took" in res.output
    import json

    assert json.loads((Path(f"{out}.run") / "config.json").read_text())["seq_len"] == 256


def test_make_help_lists_every_target():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.M))
    documented = set(re.findall(r"^([a-z][a-z-]*):.*## ", text, flags=re.M))
    assert targets == documented, f"targets without a ## help text: {sorted(targets - documented)}"
    out = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True).stdout
    for t in targets:
        assert f"make {t}" in out


def test_docs_cited_by_the_code_exist():
    cited = set()
    for path in list(ROOT.glob("**/*.py")) + [ROOT / "Makefile", ROOT / "pyproject.toml"]:
        if ".venv" in path.parts:
            continue
        cited |= set(re.findall(r"\b(docs/[A-Z]+\.md)\b", path.read_text(errors="ignore")))
        assert not re.search(r"(?<!docs/)\bFACTS\.md\b", path.read_text(errors="ignore")), path
    assert cited and all((ROOT / c).exists() for c in cited), cited


def test_readme_python_snippets_define_what_they_use():
    readme = (ROOT / "README.md").read_text()
    runtime_snippet = readme.split("from otaro.runtime import Runtime", 1)[1].split("```", 1)[0]
    assert "document =" in runtime_snippet.split("rt.logits(document")[0]
