"""The runtime on a GPU: onnxruntime's CUDA execution provider against its CPU provider, one artifact.

Issue 12's GPU item, prepared to run in one go where a GPU and onnxruntime-gpu are present (the
runtime is torch-free: numpy, onnx, onnxruntime-gpu and tokenizers are all it needs there). Per b:

- the session really runs on the device (onnxruntime drops a provider it cannot start; the
  runtime refuses that) and the in-place KV cache lives there (`Decoder.kv_device`);
- a prompt's logits against the CPU runtime at the exact level (accuracy level 1, fp32
  activations): the largest difference, the mean KL divergence and top-1 agreement per position;
- greedy tokens: how many of the first NEW match the CPU's;
- decode tokens/s (NEW greedy tokens after CTX tokens of context) and prefill tokens/s, device and
  CPU in interleaved rounds, and the cold switch time on the device.

Usage: python benchmarks/cuda_check.py ARTIFACT [--device cuda] [--bits 2,3,4,8] [--rounds 3]
       [--threads N] [--publish]
`--device cpu` runs every check against a second CPU runtime at the artifact's level: a
self-check of this script on a machine without a GPU (it publishes nothing). `--publish` (GPU
only) writes benchmarks/results/cuda.json/.png and the `cuda` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CTX, NEW = 128, 64


def prompt_ids(rt, n: int) -> list[int]:
    from otaro.arch.tiny import SAMPLE_TEXT  # a fixed English paragraph (no torch at import)

    ids = rt.encode(SAMPLE_TEXT * 8)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def decode_round(rt, ids: list[int]) -> dict:
    """A prefill of the prompt, then NEW greedy steps after it (the engines benchmark's round)."""
    import numpy as np

    dec = rt.decoder
    x = np.asarray([ids], np.int64)
    t0 = time.perf_counter()
    logits, past = dec.forward(x, np.ones_like(x), dec.empty_past(1), rows=[[len(ids) - 1]])
    prefill = len(ids) / (time.perf_counter() - t0)
    mask = np.ones_like(x)
    t0 = time.perf_counter()
    for _ in range(NEW):
        tok = np.argmax(logits[:, -1], axis=-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, past = dec.forward(tok, mask, past)
    return {"prefill_tps": prefill, "decode_tps": NEW / (time.perf_counter() - t0)}


def compare(ref, got) -> dict:
    """Logits [T, V] of one prompt from two runtimes: how far apart."""
    import numpy as np

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    return {"max_abs_diff": float(np.abs(ref - got).max()),
            "kld": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def measure(args) -> dict:
    import onnxruntime as ort

    from otaro.runtime import Runtime

    dev = Runtime.load(args.artifact, device=args.device, threads=args.threads, cache_bytes=0, verify=False)
    ref = Runtime.load(args.artifact, device="cpu", threads=args.threads, accuracy_level=1, cache_bytes=0,
                       verify=False)
    cpu = Runtime.load(args.artifact, device="cpu", threads=args.threads, cache_bytes=0, verify=False)
    bits = [b for b in args.bits if b in dev.bits_available]
    ids = prompt_ids(dev, CTX)
    rows = []
    for b in bits:
        switch = dev.set_precision(b)
        ref.set_precision(b)
        cpu.set_precision(b)
        session = dev.decoder.session
        row = {"bits": b, "providers": session.get_providers(), "kv_device": dev.decoder.kv_device,
               "switch_s": switch.seconds, "session_s": switch.session_seconds,
               **compare(ref.logits(ids), dev.logits(ids))}
        want = ref.generate(ids, max_new_tokens=32).token_ids
        have = dev.generate(ids, max_new_tokens=32).token_ids
        row["greedy_match"] = next((i for i, (a, c) in enumerate(zip(want, have)) if a != c), min(len(want), len(have)))
        rounds = {"device": [], "cpu": []}
        for _ in range(args.rounds + 1):  # the first is a warm-up, dropped
            for name, rt in (("device", dev), ("cpu", cpu)):
                rounds[name].append(decode_round(rt, ids))
        for name, got in rounds.items():
            for key in ("decode_tps", "prefill_tps"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in got[1:])
        rows.append(row)
        print(f"b={b}: {row['providers'][0]}, KV on {row['kv_device'] or 'host'}, max|Δ| {row['max_abs_diff']:.3g}, "
              f"KLD {row['kld']:.3g}, top-1 {row['top1']:.3f}, greedy {row['greedy_match']}/32, decode "
              f"{row['device_decode_tps']:.1f} vs cpu {row['cpu_decode_tps']:.1f} tok/s, switch {row['switch_s']:.2f} s",
              flush=True)
    return {"artifact": str(args.artifact), "device": args.device, "threads": args.threads,
            "machine": f"{platform.machine()}, onnxruntime {ort.__version__}, {ort.get_device()}",
            "ctx": CTX, "new": NEW, "rounds": args.rounds, "rows": rows}


def markdown(res: dict) -> str:
    lines = [
        "## The runtime on a GPU: onnxruntime's CUDA provider against its CPU provider (`benchmarks/cuda_check.py`)",
        "",
        f"Command: `python benchmarks/cuda_check.py ARTIFACT --device {res['device']}`. Machine: {res['machine']}. "
        f"Logits of a {res['ctx']}-token prompt against the CPU runtime at the exact level (accuracy level 1); "
        f"decode: {res['new']} greedy tokens after {res['ctx']} tokens of context, {res['rounds']} interleaved "
        "rounds, medians.",
        "",
        "| b | runs on | KV cache on | max abs Δ logits | KLD | top-1 | greedy match /32 | decode tok/s device | "
        "decode tok/s CPU | prefill tok/s device | cold switch s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        kv = r["kv_device"][0] if r["kv_device"] else "host"
        lines.append(f"| {r['bits']} | {r['providers'][0]} | {kv} | {r['max_abs_diff']:.3g} | {r['kld']:.3g} | "
                     f"{r['top1']:.3f} | {r['greedy_match']} | {r['device_decode_tps']:.1f} | "
                     f"{r['cpu_decode_tps']:.1f} | {r['device_prefill_tps']:.0f} | {r['switch_s']:.2f} |")
    return "\n".join(lines + ["", "![cuda](results/cuda.png)", ""])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from results_md import save_figure

    rows = res["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [r["device_decode_tps"] for r in rows], 0.4, label=res["device"])
    ax.bar(x + 0.2, [r["cpu_decode_tps"] for r in rows], 0.4, label="cpu")
    ax.set_xticks(x, [f"b={r['bits']}" for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    save_figure(fig, path)


def _bit_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of bit-widths, e.g. 2,4,8") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path, help="an `otaro export` folder")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--bits", default="2,3,4,8", type=_bit_list, help="comma-separated bit-widths")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--publish", action="store_true", help="write the `cuda` section of RESULTS.md (GPU only)")
    args = p.parse_args()
    if args.publish and args.device == "cpu":
        raise SystemExit("--publish is for a GPU run; --device cpu is the script's self-check")
    from otaro.errors import OtaroError

    try:
        res = measure(args)
    except OtaroError as e:
        raise SystemExit(f"cuda_check: {e}")
    if args.publish:
        from results_md import publish

        print(publish("cuda", res, plot, markdown))


if __name__ == "__main__":
    main()
