"""How long a fine-tuning run will take, said before it starts and corrected once it runs.

Before the first step: a FLOP count (forward + backward ≈ 6 x parameters x tokens, plus
2 x parameters x tokens for a distillation teacher's forward, plus the attention scores) divided
by this machine's *measured* matmul speed on a layer-shaped product, times an allowance for the
work around the matmuls (attention, norms, softmax, autograd); plus the fake-quantization of
every weight at every step, *measured* on one of the model's own layers and scaled by the
number of quantized weights (on CPU it is not small: for SmolLM2-135M it was tens of seconds
per step). It is a rough figure and is printed as one. After the first steps the measured seconds
per step replace it (the progress bar's ETA, and one line in logs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Measured on SmolLM2-135M on the 2-core build machine: an fp32 forward of 2 x 512 tokens took
# 13.9 s against 5.6 s for its FLOPs at the measured 49 GFLOP/s (eager attention, the head's
# softmax, norms): the allowance below.
NON_MATMUL_ALLOWANCE = 2.5


@dataclass(frozen=True)
class TimeEstimate:
    flops_per_step: float
    matmul_flops_per_s: float
    quantize_seconds_per_step: float  # measured fake-quantization of every weight, once per step
    seconds_per_step: float
    steps: int

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_step * self.steps


def measure_matmul_speed(hidden: int, device, seconds: float = 0.25) -> float:
    """FLOP/s of a [512, hidden] x [hidden, 4*hidden] fp32 matmul on ``device`` (best of a few)."""
    hidden = max(64, min(int(hidden), 4096))
    a = torch.randn(512, hidden, device=device)
    b = torch.randn(hidden, 4 * hidden, device=device)
    flops = 2 * 512 * hidden * 4 * hidden
    best = float("inf")
    end = time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up: thread pool and allocator
    while True:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > end:
            break
    return flops / max(best, 1e-9)


def estimate_time(model, *, steps: int, batch_size: int, seq_len: int, num_processes: int = 1,
                  distill: bool = False, device=None) -> TimeEstimate:
    """Rough wall time of the run on this machine (each process does batch/num_processes)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        params += head.weight.numel()  # a tied head is one tensor but a second matmul
    tokens = batch_size // max(1, num_processes) * seq_len
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    hidden = int(getattr(cfg, "hidden_size", 512) or 512)
    attention = 2 * 2 * layers * seq_len * hidden * tokens  # QK^T and AV, forward
    flops = 6 * params * tokens + 3 * attention + ((2 * params * tokens + attention) if distill else 0)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    speed = measure_matmul_speed(hidden, device)
    quant = measure_fake_quant(model)
    return TimeEstimate(flops, speed, quant, NON_MATMUL_ALLOWANCE * flops / speed + quant, steps)


def measure_fake_quant(model, repeats: int = 2) -> float:
    """Seconds to fake-quantize every quantized weight of ``model`` once (what each training
    forward does), from timing its largest quantized layer (best of ``repeats``)."""
    layers = [m for m in model.modules() if hasattr(m, "quantized_weight") and getattr(m, "weight", None) is not None]
    if not layers:
        return 0.0
    total = sum(m.weight.numel() for m in layers)
    probe = max(layers, key=lambda m: m.weight.numel())
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            probe.quantized_weight()
            best = min(best, time.perf_counter() - t)
    return best * total / probe.weight.numel()


def human_seconds(s: float) -> str:
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
