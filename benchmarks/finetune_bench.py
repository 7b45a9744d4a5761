"""Fine-tuning recipe study on SmolLM2-135M: what `otaro finetune` adds to the one SEFP model,
judged by KL divergence to the fp32 model (with top-1 agreement and perplexity) at every b.

Runs, all from the same model, data, steps, batch, learning rate and seed, in the default
SEFP format, with the head and embedding in float (as the quality benchmark's rows):
  otaro        the paper's recipe: BPS path + LAA + distillation from the fp32 model, from its
               weights (LAA is set explicitly: `otaro finetune` defaults to --no-laa since this study)
  no-distill   the same on the language-model loss only
  no-laa       BPS without LAA
  round-robin  a cyclic path instead of BPS (LAA kept)
  lr/4         the recipe at a quarter of the learning rate (does b = 8 drift less?)
  bits-3-8     the recipe with b = 2 left off the path (the product reads at 3-8)
  rr-no-laa    a cyclic path and no LAA (both ablations at once)
  frozen-rtn   the recipe started from the RTN checkpoint with `--init` (its scales frozen, as
               from-gptq's are: separates "frozen scales" from "a better start")
  from-gptq    the recipe started from the multi-bit GPTQ checkpoint (`--init`, scales frozen)
  from-gptq-no-laa  the same without LAA
and, untrained, the two starts: RTN in the format (`rtn`) and multi-bit GPTQ (`gptq`, λ as the
quality benchmark's "low" rows). Evaluation: the quality benchmark's windows (evenly spaced
512-token windows of Brown k–r and Austen), reference = the fp32 model.

Writes benchmarks/results/finetune.json, benchmarks/results/finetune.png and the `finetune`
section of benchmarks/RESULTS.md. Checkpoints go to the asset cache (never the repo); --reuse
evaluates checkpoints an earlier run left with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import update_section  # noqa: E402

TEXTS = ("corpus:brown-eval", "corpus:austen")
DATA = ("corpus:brown-train",)
GPTQ_TARGETS = "3:16,4:4,8:1"  # quality.py's "low" λ: the precisions the product reads at weigh most
LOW = (2, 3, 4)
RUNS = {
    "otaro": {},
    "no-distill": {"distill": 0.0},
    "no-laa": {"laa": False},
    "round-robin": {"path": "round-robin"},
    "lr/4": {"lr_scale": 0.25},
    "bits-3-8": {"bits": (3, 4, 5, 6, 7, 8)},
    "rr-no-laa": {"path": "round-robin", "laa": False},
    "frozen-rtn": {"init": "rtn"},
    "from-gptq": {"init": "gptq"},
    "from-gptq-no-laa": {"init": "gptq", "laa": False},
}
ORDER = ("rtn", "otaro", "no-distill", "no-laa", "round-robin", "rr-no-laa", "lr/4", "bits-3-8", "frozen-rtn", "gptq",
         "from-gptq", "from-gptq-no-laa")


def default_format() -> str:
    from otaro.formats import DEFAULT_SEFP

    return DEFAULT_SEFP


def run_dir(cache: Path, name: str) -> Path:
    """A run's checkpoint folder ("lr/4" is a run name, not a subfolder)."""
    return cache / name.replace("/", "-")


def portable(path: str) -> str:
    """A path as written into results: under the home folder as ~/..., never a machine path."""
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + "/") else path


def make_start(args, cache: Path, method: str) -> Path:
    """A post-training checkpoint a run starts from with --init (made once, then reused):
    `gptq` = multi-bit GPTQ with λ = GPTQ_TARGETS, `rtn` = round to nearest."""
    from otaro.quantize import QuantizeConfig, quantize

    out = cache / f"start-{method}"
    extra = dict(calib=DATA, calib_samples=args.calib_samples, calib_len=args.calib_len, bits=GPTQ_TARGETS) \
        if method == "gptq" else {}
    cfg = QuantizeConfig(model=args.model, output=str(out), method=method, format=args.format, head_bits=None,
                         overwrite=True, **extra)
    manifest = out / "otaro.json"
    if args.reuse and manifest.is_file():
        print(f"[{method}] reusing {out}")
        return out
    print(f"[{method}] quantizing a start ...", flush=True)
    t = time.perf_counter()
    quantize(cfg)
    print(f"[{method}] {time.perf_counter() - t:.0f} s", flush=True)
    return out


def train_all(args, cache: Path, starts: dict[str, Path]) -> dict:
    from otaro.training.config import FinetuneConfig
    from otaro.training.trainer import finetune

    done = {}
    for name, kw in RUNS.items():
        kw = dict(kw)
        if kw.get("init"):
            kw["init"] = str(starts[kw["init"]])
        out = run_dir(cache, name)
        # laa=True explicitly: the runs ablate from the paper's recipe, whatever the CLI default is
        base = dict(distill=args.distill, laa=True, lr=args.lr * kw.pop("lr_scale", 1.0))
        base.update(kw)
        cfg = FinetuneConfig(
            model=args.model, data=DATA, output=str(out), format=args.format, steps=args.steps,
            seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=max(1, args.steps // 10),
            heldout_fraction=0.01, eval_every=args.steps, save_every=args.steps, eval_batches=1, seed=args.seed,
            overwrite=True, head_bits=None, **base,
        )
        manifest = out / "otaro.json"
        if args.reuse and manifest.is_file():
            stored = json.loads(manifest.read_text())["method"]["config"]
            if cfg.resume_mismatch(stored) in ([], ["overwrite"]):
                print(f"[{name}] reusing {out}")
                done[name] = dict(json.loads(manifest.read_text())["finetune"], reused=True)
                continue
        print(f"[{name}] training {args.steps} steps ...", flush=True)
        t = time.perf_counter()
        finetune(cfg, show_progress=False)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", flush=True)
        done[name] = json.loads(manifest.read_text())["finetune"]
    for st in done.values():
        if st.get("init"):
            st["init"]["checkpoint"] = portable(st["init"]["checkpoint"])
    return done


def evaluate_all(args, cache: Path, starts: dict[str, Path]) -> tuple[list[dict], dict]:
    from otaro.evaluation.run import EvalConfig, run_eval

    common = dict(texts=TEXTS, seq_len=args.eval_seq_len, max_windows=args.eval_windows, batch_size=2)
    base = run_eval(EvalConfig(args.model, formats=(args.format,), head_bits=None, **common), show_progress=False)
    rows = []
    for r in base["rows"]:
        r["method"] = "fp32" if r["label"] == "fp32" else "rtn"
        rows.append(r)
    for name, path in [("gptq", starts["gptq"]), *((n, run_dir(cache, n)) for n in RUNS)]:
        res = run_eval(EvalConfig(str(path), **common), show_progress=False)
        for r in res["rows"]:
            r["method"] = name
        rows += res["rows"]
        print(f"[{name}] evaluated", flush=True)
    return rows, base


def step_overhead(args) -> dict:
    """Median time of a training step with SEFP fake quantization vs the plain model."""
    import copy

    import torch

    from otaro.modules import convert, set_precision
    from otaro.sources import load_source

    src = load_source(args.model)
    x = torch.randint(0, src.model.config.vocab_size, (args.batch_size, args.seq_len))

    def timed(model, n=4):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    plain = copy.deepcopy(src.model).train()
    t_plain = timed(plain)
    del plain
    q = convert(copy.deepcopy(src.model), args.format, packed=False).train()
    set_precision(q, 4)
    t_q = timed(q)
    return {"plain_s": t_plain, "sefp_s": t_q, "overhead": t_q / t_plain - 1}


def mean(rows, method, bits, key="kld"):
    sel = [r[key] for r in rows if r["method"] == method and r["bits"] == bits]
    return sum(sel) / len(sel) if sel else None


def goals(rows) -> list[dict]:
    out = []

    def beats(a, b, bits, what):
        lost = [x for x in bits if not mean(rows, a, x) < mean(rows, b, x)]
        cells = ", ".join(f"b={x} {mean(rows, a, x):.3f} vs {mean(rows, b, x):.3f}" for x in bits)
        out.append({"met": not lost, "text": f"{what} at every b ≤ 4 (KLD, mean over texts): {cells}"
                    + (f" — not at b={lost}" if lost else "")})

    beats("otaro", "rtn", LOW, "fine-tuned (otaro) beats its PTQ start (RTN)")
    beats("from-gptq", "gptq", LOW, "fine-tuned from multi-bit GPTQ beats that start")
    for abl in ("round-robin", "no-laa"):
        beats("otaro", abl, LOW, f"BPS + LAA beats the {abl} ablation")
    beats("otaro", "no-distill", LOW, "distillation beats the LM loss alone")
    for m in ("otaro", "from-gptq"):
        k = mean(rows, m, 8)
        out.append({"met": k <= 0.005, "text": f"{m} keeps b = 8 near lossless: KLD {k:.4f} ≤ 0.005 "
                    f"(its start: {mean(rows, 'rtn' if m == 'otaro' else 'gptq', 8):.4f})"})
    return out


def reused_note(training) -> str:
    """The time above covers one invocation: say which runs it only evaluated (--reuse)."""
    reused = [name for name, st in training.items() if st.get("reused")]
    if not reused:
        return ""
    return (f" {len(reused)} of {len(training)} runs were trained by an earlier invocation with the same settings and "
            f"only evaluated here (`--reuse`: {', '.join(reused)}); the time covers this invocation.")


def markdown(result) -> str:
    rows, a, m, ov = result["rows"], result["args"], result["machine"], result["overhead"]
    methods = [x for x in ORDER if any(r["method"] == x for r in rows)]
    by = {(r["dataset"], r["method"], r["bits"]): r for r in rows}
    lines = [
        "## Fine-tuning recipe study on SmolLM2-135M (KLD to fp32 per bit-width)",
        "",
        f"Produced by `python benchmarks/finetune_bench.py` in {result['seconds'] / 60:.0f} min on {m['processor']}, "
        f"{m['cpus']} CPUs; torch {m['torch']}, transformers {m['transformers']}, otaro {m['otaro']}."
        + reused_note(result["training"]),
        f"Every run: {a['steps']} steps × batch {a['batch_size']} × {a['seq_len']} tokens of Brown a–j, AdamW lr "
        f"{a['lr']} (cosine, 10% warmup), distillation weight {a['distill']} unless the run drops it, format "
        f"{a['format']} (head and embedding float), seed {a['seed']}, bits 2–8 unless the run names others. `gptq` is multi-bit GPTQ with "
        f"λ = {GPTQ_TARGETS} on {a['calib_samples']} × {a['calib_len']} calibration tokens; `from-gptq` starts there "
        f"(`--init`). Evaluation: {a['eval_windows']} × {a['eval_seq_len']}-token windows per text, KLD / top-1 against the fp32 model.",
        "This is a CPU-sized budget (a few thousand tokens per bit-width): it ranks recipes at equal cost, it is "
        "not a converged model. One seed: differences of a few percent are within run-to-run noise.",
        f"Fake-quantization overhead of a training step (batch {a['batch_size']} × {a['seq_len']}): "
        f"{ov['sefp_s']:.2f} s vs {ov['plain_s']:.2f} s without it, **{ov['overhead'] * 100:+.0f}%**.",
        "",
    ]
    for d in dict.fromkeys(r["dataset"] for r in rows if r["method"] != "fp32"):
        lines += [f"### {d}: KLD (top-1 agreement)", "", "| b | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for b in range(2, 9):
            cells = [f"{by[(d, x, b)]['kld']:.3f} ({100 * by[(d, x, b)]['top1']:.0f}%)" if (d, x, b) in by else ""
                     for x in methods]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Steps per bit-width on each run's path (BPS scores the loss gap to the top precision):", ""]
    for name, st in result["training"].items():
        c = Counter(st["path"])
        lines.append(f"- {name}: " + ", ".join(f"b{b}×{c[b]}" for b in sorted(c))
                     + f"; {st['optimizer_updates']} optimizer updates, {st['seconds'] / 60:.1f} min")
    best = min(RUNS, key=lambda n: sum(mean(rows, n, b) for b in (3, 4)))
    lines += ["", f"Lowest KLD at b = 3 + 4 (mean over texts): **{best}**.", "",
              "Goals, checked on these numbers (✓ met, ✗ missed):", ""]
    lines += [f"- {'✓' if g['met'] else '✗'} {g['text']}" for g in result["goals"]]
    lines += ["", "![KLD per bit-width](results/finetune.png)"]
    return "\n".join(lines)


def plot(rows, path: Path):
    from plots import ppl_panels

    styles = {"rtn": ":x", "otaro": "-o", "no-distill": "--^", "no-laa": "--s", "round-robin": "--v",
              "lr/4": "-.<", "bits-3-8": "-.>", "rr-no-laa": "--o", "frozen-rtn": "-.x", "from-gptq-no-laa": "--D", "gptq": ":+", "from-gptq": "-D"}
    ppl_panels([r for r in rows if r["method"] != "fp32"], path, series="method", x="bits",
               xlabel="weight bit-width b", title=lambda d: f"SmolLM2-135M fine-tuning recipes — {d}",
               style=lambda name: styles.get(name, "-"), metric="kld")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default=None, help="SEFP format (default: the project default)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--distill", type=float, default=1.0, help="distillation weight of the recipe (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows (default 32)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=3)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints of an earlier run with the same settings")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md (smoke runs)")
    args = ap.parse_args()
    args.format = args.format or default_format()

    from otaro.assets.cache import cache_dir
    from otaro.errors import OtaroError
    from otaro.io import write_json

    cache = cache_dir() / "bench" / "finetune-recipe" / args.model / args.format
    t0 = time.perf_counter()
    try:
        overhead = step_overhead(args)
        print(f"fake-quant overhead {overhead}", flush=True)
        starts = {m: make_start(args, cache, m) for m in ("gptq", "rtn")}
        train_stats = train_all(args, cache, starts)
        rows, base = evaluate_all(args, cache, starts)
    except OtaroError as e:
        print(f"skipped: {e}")
        return 0
    result = {"args": vars(args), "rows": rows, "training": train_stats, "overhead": overhead,
              "machine": base["machine"], "seconds": time.perf_counter() - t0}
    result["goals"] = goals(rows)
    body = markdown(result)
    print(body)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        write_json(HERE / "results" / "finetune.json", result)
        plot(rows, HERE / "results" / "finetune.png")
        update_section("finetune", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
