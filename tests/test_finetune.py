"""Once-for-all fine-tuning on tiny models (CPU, seconds)."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from otaro.arch.tiny import SAMPLE_TEXT
from otaro.errors import OtaroError
from otaro.training.config import FinetuneConfig
from otaro.training.laa import LAA, LAAConfig
from otaro.training.report import read_log
from otaro.training.trainer import finetune, run_dir_for


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text((SAMPLE_TEXT + "\n\n") * 40, encoding="utf-8")
    return p


def cfg(corpus, out, **kw):
    base = dict(model="tiny-llama", data=(str(corpus),), output=str(out), steps=24, seq_len=32, batch_size=4, lr=3e-3,
                warmup_steps=2, eval_every=8, save_every=8, bits=(2, 3, 4, 8), heldout_fraction=0.1, eval_batches=2)
    base.update(kw)
    return FinetuneConfig(**base)


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def test_loss_falls_at_every_trained_bit_width_and_outputs_are_complete(tmp_path, corpus):
    out = finetune(cfg(corpus, tmp_path / "ck", steps=40, path="round-robin"), show_progress=False)
    log = read_log(run_dir_for(out) / "log.jsonl")
    evals = [r["eval"] for r in log if "eval" in r]
    first, last = evals[0], evals[-1]
    for b in ("2", "3", "4", "8"):
        assert last[b] < first[b] - 0.3, (b, first[b], last[b])
    m = json.loads((out / "otaro.json").read_text())
    assert m["trained_bits"] == [2, 3, 4, 8] and m["format"]["name"] == "sefp-g64-trunc"
    assert len(m["finetune"]["path"]) == 40 and set(m["finetune"]["path"]) == {2, 3, 4, 8}
    assert (run_dir_for(out) / "training.png").stat().st_size > 1000
    from otaro import checkpoint

    model = checkpoint.load(out, bits=3)  # the exporter's input: a regular SEFP checkpoint
    assert model.get_precision()["model.layers.0.mlp.up_proj"] == 3


def test_optimizer_updates_follow_the_laa_plan(tmp_path, corpus):
    out = finetune(cfg(corpus, tmp_path / "ck", path="round-robin", laa_k=2), show_progress=False)
    m = json.loads((out / "otaro.json").read_text())["finetune"]
    laa = LAA(LAAConfig(threshold=4, k=2))
    for b in m["path"]:
        laa.commit(laa.plan(b))
    laa.commit(laa.flush_plan())
    assert m["optimizer_updates"] == laa.updates < len(m["path"])
    assert m["laa_flushes"] == laa.flushes > 0
    updates = [r["update"] for r in read_log(run_dir_for(out) / "log.jsonl") if "update" in r]
    assert updates.count("accumulate") > 0 and updates.count("flush") > 0


def test_no_laa_updates_every_step(tmp_path, corpus):
    out = finetune(cfg(corpus, tmp_path / "ck", laa=False, steps=10), show_progress=False)
    assert json.loads((out / "otaro.json").read_text())["finetune"]["optimizer_updates"] == 10


def test_resume_after_an_interruption_matches_a_straight_run(tmp_path, corpus):
    # round-robin over (2,3,8) with k=4: the save at step 8 has low-bit gradients pending
    kw = dict(path="round-robin", bits=(2, 3, 8), steps=16, save_every=4, laa_k=4)
    straight = finetune(cfg(corpus, tmp_path / "a", **kw), show_progress=False)
    interrupted = cfg(corpus, tmp_path / "b", **kw)
    assert finetune(interrupted, show_progress=False, stop_after=10) is None
    assert (run_dir_for(tmp_path / "b") / "state" / "grads-rank0.safetensors").exists()
    with pytest.raises(OtaroError, match="unfinished run"):
        finetune(interrupted, show_progress=False)
    with pytest.raises(OtaroError, match="different config"):
        finetune(cfg(corpus, tmp_path / "b", **{**kw, "lr": 1e-3}, resume=True), show_progress=False)
    resumed = finetune(cfg(corpus, tmp_path / "b", **kw, resume=True), show_progress=False)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_log(run_dir_for(resumed) / "log.jsonl") if "bits" in r]
    assert steps == list(range(1, 17))  # the log reads as one run


def test_resume_after_a_killed_process(tmp_path, corpus):
    """A real SIGKILL mid-run: the state written before it is enough to finish."""
    kw = dict(path="round-robin", steps=12, save_every=3)
    out = tmp_path / "k"
    script = textwrap.dedent(f"""
        import os, signal
        from otaro.training import trainer
        from otaro.training.config import FinetuneConfig
        cfg = FinetuneConfig(**{json.dumps(cfg(corpus, out, **kw).to_dict())!r} and __import__('json').loads({json.dumps(json.dumps(cfg(corpus, out, **kw).to_dict()))}))
        real = trainer.train_step
        def step(run):
            rec = real(run)
            if rec["step"] == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            return rec
        trainer.train_step = step
        trainer.finetune(cfg, show_progress=False)
    """).replace("FinetuneConfig(**", "FinetuneConfig.from_dict(").replace(" and __import__('json').loads(", "[:0] or __import__('json').loads(")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and not out.exists()
    resumed = finetune(cfg(corpus, out, **kw, resume=True), show_progress=False)
    straight = finetune(cfg(corpus, tmp_path / "s", **kw), show_progress=False)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zoo_run_trains_one_bit_width(tmp_path, corpus):
    out = finetune(cfg(corpus, tmp_path / "z", path="fixed", fixed_bits=3, steps=6), show_progress=False)
    m = json.loads((out / "otaro.json").read_text())
    assert m["trained_bits"] == [3] and set(m["finetune"]["path"]) == {3}


def test_bad_input_fails_before_compute(tmp_path, corpus):
    from otaro.cli import cli

    def fails(*args, needle):
        res = CliRunner().invoke(cli, ["finetune", *map(str, args)], catch_exceptions=False)
        assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output, res.output

    out = tmp_path / "o"
    (tmp_path / "empty.txt").write_text("")
    fails("tiny-llama", "--data", tmp_path / "empty.txt", "-o", out, "--seq-len", 32, needle="empty")
    fails("tiny-llama", "--data", tmp_path / "nope.txt", "-o", out, "--seq-len", 32, needle="nope.txt")
    fails("tiny-llama", "--data", corpus, "-o", out, "--seq-len", 4096, needle="larger than the model allows")
    fails("tiny-llama", "--data", corpus, "-o", out, "--bits", "1-8", needle="bit-width 1")
    fails("tiny-llama", "--data", corpus, "-o", out, "--format", "int4-g64-asym", needle="SEFP")
    fails(tmp_path, "--data", corpus, "-o", out, needle="not a Hugging Face model folder")
    fails("tiny-llama", "--data", corpus, "-o", out, "--seq-len", 32, "--resume", needle="no saved state")
    assert not out.exists()


def test_two_process_run_matches_one_process_with_the_same_global_batch(tmp_path, corpus):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    kw = dict(path="round-robin", bits=(2, 3, 8), steps=8, batch_size=4, laa_k=2, save_every=100)
    single = finetune(cfg(corpus, tmp_path / "one", **kw), show_progress=False)
    spec = tmp_path / "cfg.json"
    spec.write_text(json.dumps(cfg(corpus, tmp_path / "two", **kw).to_dict()))
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "from otaro.training.config import FinetuneConfig\n"
        "from otaro.training.trainer import finetune\n"
        "finetune(FinetuneConfig.from_dict(json.load(open(sys.argv[1]))), show_progress=False)\n"
    )
    res = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29571", str(script), str(spec)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(single), weights(tmp_path / "two")
    # Same data, path and updates; only the order of floating-point sums differs (each rank
    # averages its half of the batch, then gloo averages the two), so agreement is to fp32
    # rounding amplified over 8 Adam steps, not bit-exact.
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-4) or torch.equal(a[k], b[k]), k


def test_bf16_gradient_checkpointing_and_distillation_run(tmp_path, corpus):
    out = finetune(cfg(corpus, tmp_path / "m", steps=4, mixed_precision="bf16", gradient_checkpointing=True,
                       distill=0.5, eval_every=4), show_progress=False)
    log = read_log(run_dir_for(out) / "log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)  # finite, positive
    m = json.loads((out / "otaro.json").read_text())
    assert m["method"]["config"]["distill"] == 0.5


def test_jsonl_prompt_response_data_trains(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"Question {i}: what does the miller count?", "response": " His sacks of grain, one by one."}
            for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = finetune(FinetuneConfig(model="tiny-qwen2", data=(str(data),), output=str(tmp_path / "q"), steps=4, seq_len=32,
                                  batch_size=2, bits=(3, 8), heldout_fraction=0.1, eval_every=4, eval_batches=1),
                   show_progress=False)
    assert (out / "otaro.json").is_file()
