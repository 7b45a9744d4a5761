"""Once-for-all fine-tuning on tiny models (CPU, seconds)."""

import gc
import json
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from otaro.arch import ARCHS
from otaro.arch.tiny import SAMPLE_TEXT, tiny_model
from otaro.cli import cli
from otaro.errors import OtaroError
from otaro.formats import DEFAULT_SEFP
from otaro.training.config import FinetuneConfig
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
    assert m["trained_bits"] == [2, 3, 4, 8] and m["format"]["name"] == DEFAULT_SEFP
    assert len(m["finetune"]["path"]) == 40 and set(m["finetune"]["path"]) == {2, 3, 4, 8}
    assert (run_dir_for(out) / "training.png").stat().st_size > 1000
    from otaro import checkpoint

    model = checkpoint.load(out, bits=3)  # the exporter's input: a regular SEFP checkpoint
    assert model.get_precision()["model.layers.0.mlp.up_proj"] == 3


def test_laa_makes_one_optimizer_update_per_step_over_32_steps(tmp_path, corpus):
    """The starvation defect: the old LAA skipped the update of k-1 of every k low-bit steps
    (15 updates in 32 steps on SmolLM2). Every step must now make exactly one update, counted
    here by torch itself (a global optimizer step hook), not by the trainer's own counter."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    try:
        out = finetune(cfg(corpus, tmp_path / "ck", steps=32, eval_every=32, save_every=32, laa=True),
                       show_progress=False)
    finally:
        handle.remove()
    m = json.loads((out / "otaro.json").read_text())["finetune"]
    low = sum(b <= 4 for b in m["path"])  # LAA's default threshold
    assert len(m["path"]) == 32 and low >= 8  # BPS's gap score favours the low bit-widths
    assert len(calls) == m["optimizer_updates"] == 32
    assert m["laa_low_bit_updates"] == low
    recs = [r for r in read_log(run_dir_for(out) / "log.jsonl") if "update" in r]
    assert [r["update"] for r in recs] == ["laa" if r["bits"] <= 4 else "step" for r in recs]
    assert all(1 <= r["window"] <= 4 for r in recs if r["update"] == "laa")


def test_no_laa_updates_every_step(tmp_path, corpus):
    out = finetune(cfg(corpus, tmp_path / "ck", laa=False, steps=10), show_progress=False)
    assert json.loads((out / "otaro.json").read_text())["finetune"]["optimizer_updates"] == 10


def test_resume_after_an_interruption_matches_a_straight_run(tmp_path, corpus):
    # round-robin over (2,3,8) with k=4: the save at step 8 has a non-empty LAA window (the
    # running mean in p.grad), which the resumed run must continue exactly
    kw = dict(path="round-robin", bits=(2, 3, 8), steps=16, save_every=4, laa=True, laa_k=4)
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


def test_two_process_run_matches_one_process_with_the_same_global_batch(tmp_path, corpus, monkeypatch):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    from otaro.training import loss

    # Chunks of 8 positions (the tiny vocabulary would otherwise fit one chunk): DDP must see
    # the tied head's gradient from several checkpointed chunks, summed once per backward.
    monkeypatch.setattr(loss, "MIN_CHUNK_POSITIONS", 8)
    monkeypatch.setattr(loss, "LOGITS_CHUNK_BYTES", 1)
    kw = dict(path="round-robin", bits=(2, 3, 8), steps=8, batch_size=4, laa_k=2, save_every=100)
    single = finetune(cfg(corpus, tmp_path / "one", **kw), show_progress=False)
    spec = tmp_path / "cfg.json"
    spec.write_text(json.dumps(cfg(corpus, tmp_path / "two", **kw).to_dict()))
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "from otaro.training import loss\n"
        "from otaro.training.config import FinetuneConfig\n"
        "from otaro.training.trainer import finetune\n"
        "loss.MIN_CHUNK_POSITIONS, loss.LOGITS_CHUNK_BYTES = 8, 1\n"
        "finetune(FinetuneConfig.from_dict(json.load(open(sys.argv[1]))), show_progress=False)\n"
    )
    res = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29571", str(script), str(spec)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(single), weights(tmp_path / "two")
    # Same data, path and updates; only the order of floating-point sums differs (each rank
    # averages its half of the batch, then gloo averages the two), so agreement is to fp32
    # rounding amplified over 8 Adam steps, not bit-exact. The checkpoint stores integer SEFP
    # codes: a weight that ends within ~1e-7 of a rounding boundary can land one code apart, so
    # a handful of +-1 codes (measured: 1 of 4096 in one tensor) is rounding, while a sync bug
    # moves most codes of every tensor.
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        assert d.max() <= 1 and (d > 1e-4).float().mean() <= 2e-3, (k, int((d > 1e-4).sum()), float(d.max()))


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


# -- the chunked loss: equal to the model's own, without the batch's full-vocabulary logits ------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_chunked_loss_and_gradients_match_the_models_own(arch):
    from otaro.training.loss import body_and_head, causal_lm_loss

    model = tiny_model(arch).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, head = body_and_head(model)
    rows = []
    hook = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        got = causal_lm_loss(model, ids, labels, chunk=8)
        got.backward()
    finally:
        hook.remove()
    # 3*20 - 6 = 54 trained positions in chunks of 8; forward + one recompute per chunk in backward
    assert max(rows) == 8 and sum(rows) == 2 * 54
    # fp32: the same sums taken in another order (per chunk, then over chunks) -- ~1e-7 relative
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-7, msg=n)


def test_chunked_distillation_matches_full_logits_kl():
    from otaro.training.loss import causal_lm_loss

    student, teacher = tiny_model("qwen2", seed=0).train(), tiny_model("qwen2", seed=1).eval()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :5] = -100
    T, w = 2.0, 0.5
    got = causal_lm_loss(student, ids, labels, teacher=teacher, distill=w, temperature=T, chunk=5)
    out = student(input_ids=ids, labels=labels)
    keep = labels[:, 1:] != -100  # positions that predict a labelled token
    s = torch.log_softmax(out.logits[:, :-1][keep] / T, -1)
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1][keep] / T, -1)
    want = out.loss + w * torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), after handing
    the memory earlier tests freed back to the OS: glibc keeps freed heap pages resident, and a
    measured step would reuse them without growing RSS."""
    import ctypes
    import ctypes.util

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except (OSError, AttributeError):
        return False


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive while active: every op's output storage is counted
    until it is garbage (a weakref finalizer). Allocator-independent, unlike RSS, which glibc's
    arenas and mmap threshold move by tens of MiB at this scale."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if key not in self.seen:
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out


def test_chunked_loss_never_holds_the_batchs_full_logits():
    from transformers import LlamaConfig

    from otaro.training.loss import causal_lm_loss

    V = 32768
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, V, (8, 257))
    causal_lm_loss(model, ids[:, :9], ids[:, :9]).backward()  # allocate the gradients first
    full = 8 * 256 * V * 4  # one fp32 [positions, vocab] logits tensor: 256 MiB
    chunk = 128 * V * 4  # 16 MiB
    with _LiveBytes() as mem:
        causal_lm_loss(model, ids, ids, chunk=128).backward()
    # Unchunked, the loss cannot peak below one full logits tensor (the Hugging Face loss holds
    # about three: 780 MiB of peak RSS growth on this model). Chunked: about four chunk-sized
    # tensors at once in a chunk's backward (logits, log-softmax, their gradients) plus the
    # head's 4 MiB gradient; at least the chunk's own logits, or the tracker saw nothing.
    assert chunk <= mem.peak <= 6 * chunk < full, (mem.peak / 2**20, full / 2**20)


# -- the up-front memory check -------------------------------------------------------------------


def test_a_huge_batch_is_refused_before_any_data_is_read_or_step_runs(tmp_path, corpus, monkeypatch):
    from otaro.training import data, trainer

    def must_not_run(*a, **k):
        raise AssertionError("ran past the memory check")

    monkeypatch.setattr(data, "build_splits", must_not_run)
    monkeypatch.setattr(trainer, "train_step", must_not_run)
    with pytest.raises(OtaroError) as e:
        finetune(cfg(corpus, tmp_path / "ck", batch_size=1_000_000), show_progress=False)
    msg = str(e.value)
    assert "estimated" in msg and "GiB" in msg and "activations" in msg and "batch 1000000 x seq 32" in msg
    assert "available" in msg and "--batch-size" in msg and "--seq-len" in msg and "--ignore-memory-check" in msg
    assert not (tmp_path / "ck").exists()
    res = CliRunner().invoke(cli, ["finetune", "tiny-llama", "--data", str(corpus), "-o", str(tmp_path / "c2"),
                                   "--seq-len", "32", "--batch-size", "1000000"], catch_exceptions=False)
    assert res.exit_code != 0 and "estimated" in res.output and "Traceback" not in res.output, res.output


def test_ignore_memory_check_overrides_a_refusal(tmp_path, corpus, monkeypatch):
    from otaro.training import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: (2**20, "available RAM"))  # 1 MiB free
    with pytest.raises(memory.MemoryCheckError, match="1 MiB|0.00 GiB"):
        finetune(cfg(corpus, tmp_path / "a", steps=2), show_progress=False)
    out = finetune(cfg(corpus, tmp_path / "b", steps=2, ignore_memory_check=True), show_progress=False)
    m = json.loads((out / "otaro.json").read_text())["finetune"]
    assert m["optimizer_updates"] == 2 and m["memory_estimate_bytes"] > 0


def test_memory_estimate_is_within_a_loose_factor_of_the_measured_peak(tmp_path, monkeypatch):
    """The estimate against the peak RSS growth of a real first training step (Adam's moments,
    gradients, fake-quant copies, activations, logits chunks all appear in it). A model whose
    activations dominate, so the test checks the per-layer activation model, not just weights."""
    from transformers import LlamaConfig

    from otaro.arch.tiny import tiny_tokenizer
    from otaro.training import trainer

    if not _reset_peak_rss():
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure peak RSS")
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text((SAMPLE_TEXT + "\n\n") * 200, encoding="utf-8")
    measured = {}
    real = trainer.train_step

    def step(run):
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
        rec = real(run)
        measured["growth"] = _status_bytes("VmHWM") - before
        measured["estimate"] = run.memory_estimate
        return rec

    monkeypatch.setattr(trainer, "train_step", step)
    c = FinetuneConfig(model=str(tmp_path / "m"), data=(str(text),), output=str(tmp_path / "o"), steps=2,
                       seq_len=256, batch_size=8, bits=(2, 8), heldout_fraction=0.0, eval_every=100, save_every=100)
    finetune(c, show_progress=False, stop_after=1)
    est, growth = measured["estimate"], measured["growth"]
    need = est.total - est.weights  # the loaded weights were resident before the step
    assert est.activations > 0.6 * need  # the part this test is about dominates
    # Measured on this shape: the estimate is 1.2-1.35x the growth in fp32 (and 1.0-1.5x with
    # bf16, gradient checkpointing or distillation): it sums parts that are never all alive at
    # once, by design. The band is loose because the allocator may reuse memory freed before the
    # step (growth reads low) and RSS moves in pages and arenas; an activation model that is off
    # by a factor (a missing per-layer term, the full logits coming back) falls outside it.
    assert 0.8 * growth <= need <= 2.5 * growth, (need / 2**20, growth / 2**20)


# --------------------------------------------------------------------------- --init CKPT


@pytest.fixture(scope="module")
def gptq_start(tmp_path_factory):
    """A multi-bit GPTQ checkpoint of tiny-llama in the default format (a fine-tuning start)."""
    from otaro.quantize import QuantizeConfig, quantize

    root = tmp_path_factory.mktemp("init")
    corpus = root / "calib.txt"
    corpus.write_text((SAMPLE_TEXT + "\n\n") * 40, encoding="utf-8")
    return quantize(QuantizeConfig(model="tiny-llama", output=str(root / "gptq"), method="gptq", calib=(str(corpus),),
                                   calib_samples=4, calib_len=32, bits="3:16,4:4,8:1", head_bits=None))


def test_init_starts_the_masters_at_the_checkpoints_codes(gptq_start):
    from otaro import checkpoint
    from otaro.formats import get_format
    from otaro.modules import convert, pack, quant_layers
    from otaro.sources import load_source
    from otaro.training.init import apply_init

    model = load_source("tiny-llama").model
    convert(model, get_format(DEFAULT_SEFP), packed=False)
    report = apply_init(model, gptq_start)
    start = quant_layers(checkpoint.load(gptq_start))
    # GPTQ's scale search leaves groups without a magnitude-127 code: re-deriving scales from
    # max |w| would move their codes, the frozen scales keep every one
    assert any(int(l.mantissa.abs().amax()) < 127 or
               bool((l.mantissa.to(torch.int16).abs().reshape(l.out_features, -1, l.fmt.group_size).amax(-1) < 127).any())
               for l in start.values())
    assert report.fraction == 1.0 and report.codes == sum(l.mantissa.numel() for l in start.values())
    for name, layer in quant_layers(model).items():
        for b in (2, 3, 4, 8):  # the start computes, at every precision, what the checkpoint computes
            layer.set_bits(b)
            assert torch.equal(layer.quantized_weight(), start[name].quantized_weight(b)), (name, b)
    pack(model)  # storing the start gives the checkpoint's codes and scales back
    for name, layer in quant_layers(model).items():
        assert torch.equal(layer.mantissa, start[name].mantissa) and torch.equal(layer.shared, start[name].shared)
        assert layer.fixed_shared is None


def test_finetune_from_a_checkpoint_records_its_start(tmp_path, corpus, gptq_start):
    out = finetune(cfg(corpus, tmp_path / "ck", steps=2, init=str(gptq_start)), show_progress=False)
    m = json.loads((out / "otaro.json").read_text())
    init = m["finetune"]["init"]
    assert init["checkpoint"] == str(gptq_start) and 0.9 < init["codes_reproduced"] <= 1.0
    assert m["method"]["config"]["init"] == str(gptq_start)


def test_bad_init_fails_before_compute(tmp_path, corpus, gptq_start):
    def fails(*args, needle):
        res = CliRunner().invoke(cli, ["finetune", "tiny-llama", "--data", str(corpus), "-o", str(tmp_path / "o"),
                                       "--seq-len", "32", *map(str, args)], catch_exceptions=False)
        assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output, res.output

    fails("--init", tmp_path, needle="not an otaro checkpoint")
    fails("--init", gptq_start, "--format", "sefp-g64-trunc", needle=f"--format {DEFAULT_SEFP}")
    assert not (tmp_path / "o").exists()
