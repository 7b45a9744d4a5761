"""Bit-plane SEFP matmul kernel (otaro.kernels) on a CUDA GPU: latency vs torch fp16 and the
fraction of a measured memory-bandwidth roofline.

Shapes: every linear of LLaMA-3.2-1B and LLaMA-3-8B (q, k/v, o, gate/up, down; [out, in]), at
b = 2..8 and batch 1/4/16. For each point:
  * latency of ``sefp_matmul`` (median of CUDA-event timings, after warm-up) and of the fp16
    ``x @ W^T`` it replaces (cuBLAS), and their ratio;
  * bytes the kernel must read (``bitplane_bytes_read``: the planes of ``plane_indices`` plus the
    shared values, plus x and y) over its time, as a fraction of the copy bandwidth measured at
    start (a device-to-device clone of a 1 GiB buffer; read + write bytes). At small batch the
    kernel is memory-bound, so this fraction is its efficiency; as b falls the bytes fall, and a
    good kernel's latency should follow.
Every shape is first checked against the torch reference (max error relative to max |y|), so a
fast wrong kernel cannot post a number.

Weights are random (Gaussian), encoded once per shape; the bytes read do not depend on values.
Small shapes can sit in L2 between repetitions, which flatters them; the 8B MLP shapes cannot.
Without a CUDA device it prints one line and exits 0 (Triton's interpreter is for correctness,
not speed). Writes JSON only when ``--out`` is given (never benchmarks/RESULTS.md).

Usage: python benchmarks/kernels_bench.py [--models llama-3.2-1b,llama-3-8b] [--bits 2-8]
       [--batch 1,4,16] [--format ssfp-g64-nearest] [--iters 50] [--out results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# name -> (hidden, intermediate, q heads, kv heads, head dim): the published configs.
MODELS = {
    "llama-3.2-1b": (2048, 8192, 32, 8, 64),
    "llama-3-8b": (4096, 14336, 32, 8, 128),
}


def linear_shapes(model: str) -> list[tuple[str, int, int]]:
    """(label, out N, in K) of one decoder layer's distinct linears (k and v share a shape, so
    do gate and up)."""
    h, inter, nq, nkv, hd = MODELS[model]
    return [("q_proj", nq * hd, h), ("k/v_proj", nkv * hd, h), ("o_proj", h, nq * hd),
            ("gate/up_proj", inter, h), ("down_proj", h, inter)]


def cuda_time_ms(fn, iters: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):  # compiles on the first call, then settles clocks and caches
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(iters: int) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write) of a 1 GiB buffer: the roofline."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=max(5, iters // 5), warmup=3)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench(args) -> list[dict]:
    import torch

    from otaro.formats import get_format, torch_ref
    from otaro.formats.pack import bitplane_bytes_read, needs_nonzero_plane, pack_bitplanes
    from otaro.kernels.reference import sefp_matmul_reference
    from otaro.kernels.sefp_matmul import sefp_matmul

    fmt = get_format(args.format)
    bw = copy_bandwidth_gbs(args.iters)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s; format {fmt.name}")
    print(f"{'model':14} {'linear':13} {'N':>6} {'K':>6} {'b':>2} {'M':>3} {'sefp us':>9} {'fp16 us':>9} "
          f"{'speedup':>7} {'roofline':>8}")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in args.models:
        for label, N, K in linear_shapes(model):
            w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
            m8, shared = torch_ref.sefp_encode(w, fmt)
            planes = torch.from_numpy(pack_bitplanes(m8.cpu().numpy(), nonzero_plane=needs_nonzero_plane(fmt))).cuda()
            w16 = w.half()
            for M in args.batch:
                x = torch.randn(M, K, device="cuda", generator=gen).half()
                fp16_ms = cuda_time_ms(lambda: x @ w16.T, args.iters, args.warmup)
                for b in args.bits:
                    y = sefp_matmul(x, planes, shared, b, fmt, K)
                    ref = sefp_matmul_reference(x, planes, shared, b, fmt, K)
                    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
                    if err > 1e-2:
                        raise SystemExit(f"{model} {label} b={b} M={M}: kernel disagrees with the reference "
                                         f"(max rel error {err:.3g}); not timing a wrong kernel")
                    ms = cuda_time_ms(lambda: sefp_matmul(x, planes, shared, b, fmt, K), args.iters, args.warmup)
                    nbytes = bitplane_bytes_read(fmt, b, N, K) + 2 * M * (K + N)
                    frac = nbytes / (ms * 1e-3) / 1e9 / bw
                    row = dict(model=model, linear=label, N=N, K=K, bits=b, M=M, sefp_us=ms * 1e3,
                               fp16_us=fp16_ms * 1e3, speedup=fp16_ms / ms, roofline=frac, bytes=nbytes,
                               max_rel_err=err)
                    rows.append(row)
                    print(f"{model:14} {label:13} {N:6d} {K:6d} {b:2d} {M:3d} {ms * 1e3:9.1f} {fp16_ms * 1e3:9.1f} "
                          f"{fp16_ms / ms:7.2f} {frac:8.1%}", flush=True)
    return rows


def _int_list(spec: str) -> list[int]:
    return [int(v) for v in spec.split(",") if v]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--bits", default="2-8", help="bit-widths, e.g. '2-8' or '2,4,8'")
    ap.add_argument("--batch", default="1,4,16", help="activation rows M, comma-separated")
    ap.add_argument("--format", default="ssfp-g64-nearest", help="an SEFP row of the format table")
    ap.add_argument("--iters", type=int, default=50, help="timed repetitions per point (median reported)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    from otaro.errors import OtaroError
    from otaro.formats import SEFPFormat, get_format, parse_bits

    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)}")
    try:
        args.bits = list(parse_bits(args.bits))
        if not isinstance(get_format(args.format), SEFPFormat):
            ap.error(f"--format {args.format} is not an SEFP row")
    except OtaroError as e:
        ap.error(str(e))
    try:
        args.batch = _int_list(args.batch)
    except ValueError:
        ap.error(f"--batch {args.batch!r}: use comma-separated integers, e.g. 1,4,16")
    if not args.batch or min(args.batch) < 1 or args.iters < 1 or args.warmup < 0:
        ap.error("--batch values and --iters must be >= 1, --warmup >= 0")

    try:
        import torch
    except ImportError:
        print("kernels_bench: torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA device here; this benchmark needs a GPU (skipped)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernels_bench: Triton is not installed (pip install 'otaro[kernels]'); skipped")
        return 0

    rows = bench(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
