"""Up-front memory check for ``otaro finetune``: estimate a step's peak, refuse what cannot fit.

A run that cannot fit used to be found out by the kernel's OOM killer minutes into training
(SmolLM2-135M peaked at 14 GB; a 270M model with a 262k vocabulary was killed at 22 GB). The
trainer now estimates the peak of one training step per process *before* reading any data, and
refuses with the estimate, what is available, and what to change, unless the user passes
``--ignore-memory-check``.

The estimate (``estimate_memory``) adds, per process:

* weights, gradients and AdamW's two moments: 4 copies of the trainable parameters (the master
  weights are the model's own fp32 parameters; there is no separate master copy);
* the fake-quantized weights ``Q(w, b)`` of every quantized linear (each is built in the
  forward and kept by ``F.linear`` for the backward), plus their bf16/fp16 casts under autocast;
* the frozen teacher, when distilling;
* activations kept for the backward: ``(layers + 1) x batch x seq_len x per-token-layer bytes``
  (the ``+ 1`` is the backward's transient: the gradients of one layer's activations), or with
  gradient checkpointing one hidden state per layer plus two layers' worth;
* a few copies of one logits chunk (the loss never builds the whole batch's logits, see
  :mod:`otaro.training.loss`);
* 10% allocator slack on what is allocated and freed every step.

The per-token, per-layer activation count is ``13 H + 4 I + 650`` elements (``+ heads x seq``
with eager attention). These coefficients were measured with ``saved_tensors_hooks`` on every
registered architecture (SDPA, fp32, SEFP master layers): the ``H`` factor spans 6 (Llama) to 13
(Phi-3's fused projections), the ``I`` factor is 4 (2 for GPT-NeoX's GELU MLP), and a constant
of 390-650 does not scale with either (rotary and attention bookkeeping). The largest of each
is used, so the estimate is an upper bound for every family we register; under bf16/fp16
autocast the saved bytes measured 0.55-0.6 of fp32, hence 2.5 bytes per element instead of 4.
The parts are summed although they are not all alive at the same instant (gradients fill up
while activations are freed; Adam's moments appear at the first update), so the estimate errs
high: tests hold it within a loose factor of the measured peak RSS growth of a real step.
Measured on a SmolLM2-135M-shaped random model at the defaults (batch 8 x 512, fp32; 2 CPUs):
estimate 10.3 GiB; peak RSS 8.7 GiB at the first step and 10.5 GiB at the second, of which
0.6 GiB is the Python/torch runtime the available-memory figure already excludes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from otaro.errors import OtaroError
from otaro.training.loss import chunk_positions

GiB = 2**30
# per-token, per-layer activation elements: ACT_H * hidden + ACT_I * intermediate + ACT_0
ACT_H, ACT_I, ACT_0 = 13, 4, 650
ACT_OUTSIDE_H = 8  # embeddings, final norm and the loss's copy of the hidden states, x hidden
LOGITS_COPIES, LOGITS_COPIES_DISTILL = 4, 7  # logits, log-softmax, their gradients (+ teacher's)
MIXED_ACT_BYTES = 2.5  # measured mean bytes per saved element under bf16/fp16 autocast
# Freed-and-reallocated memory does not pack perfectly (glibc keeps per-thread arenas, and large
# blocks move between mmap and the heap): on a SmolLM2-sized model (batch 8 x 512, fp32) the
# peak RSS of a later step exceeded the live bytes of the per-step parts by ~4%. 10% of them.
ALLOCATOR_SLACK = 0.10


class MemoryCheckError(OtaroError):
    """The configured run would not fit in the memory available to it."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process at the peak of a training step, by part."""

    weights: int
    gradients: int
    optimizer: int
    quantized_copies: int
    teacher: int
    activations: int
    logits: int
    allocator: int  # slack on the parts allocated and freed every step
    batch: int  # per process
    seq_len: int
    layers: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.quantized_copies + self.teacher
                + self.activations + self.logits + self.allocator)

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        parts = [f"weights {g(self.weights)}", f"gradients {g(self.gradients)}", f"AdamW state {g(self.optimizer)}",
                 f"fake-quant weight copies {g(self.quantized_copies)}"]
        if self.teacher:
            parts.append(f"teacher {g(self.teacher)}")
        parts += [f"activations {g(self.activations)} ({self.layers} layers x batch {self.batch} x seq {self.seq_len})",
                  f"logits chunk {g(self.logits)}", f"allocator slack {g(self.allocator)}"]
        return f"{g(self.total)} GiB ({', '.join(parts)} GiB)"


def _config_int(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    if default is None:
        raise OtaroError(f"{type(cfg).__name__} has none of {names}: cannot estimate training memory")
    return default


def estimate_memory(model, *, batch_size: int, seq_len: int, num_processes: int = 1, distill: bool = False,
                    gradient_checkpointing: bool = False, mixed_precision: str = "no") -> MemoryEstimate:
    """Peak bytes of one training step, per process (see the module docstring for the model).

    ``model`` is the transformers model as loaded (before SEFP conversion); ``batch_size`` is
    the global batch, split over ``num_processes``.
    """
    from otaro.arch import get_adapter, quantizable_linears

    cfg = model.config
    weights = trainable = 0
    for p in model.parameters():  # a tied head is the embedding's Parameter: listed (and counted) once
        weights += p.numel() * p.element_size()
        trainable += p.numel() * p.element_size() if p.requires_grad else 0
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    qlin = [m.weight for m in quantizable_linears(model, get_adapter(model)).values()]
    q_bytes = sum(w.numel() * w.element_size() for w in qlin)
    if mixed_precision != "no":
        q_bytes += sum(w.numel() * 2 for w in qlin)  # autocast's half-precision casts, also kept for backward

    H = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    I = _config_int(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * H)
    L = _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    V = _config_int(cfg, "vocab_size")
    heads = _config_int(cfg, "num_attention_heads", "n_head", default=1)
    B = -(-batch_size // num_processes)
    tokens = B * seq_len
    # fp32 activations only for an fp32 model without autocast; half-precision matmul outputs
    # with fp32 norm internals otherwise (what was measured under autocast)
    fp32 = mixed_precision == "no" and all(p.element_size() >= 4 for p in model.parameters())
    per_elem = 4.0 if fp32 else MIXED_ACT_BYTES
    per_token_layer = ACT_H * H + ACT_I * I + ACT_0
    if getattr(cfg, "_attn_implementation", "sdpa") == "eager":
        per_token_layer += heads * seq_len  # the softmaxed attention matrix, kept for backward
    layer_bytes = tokens * per_token_layer * per_elem
    if gradient_checkpointing:
        act = L * tokens * H * per_elem + 2 * layer_bytes  # layer inputs + one recompute + its gradients
    else:
        act = (L + 1) * layer_bytes
    act += tokens * ACT_OUTSIDE_H * H * per_elem
    chunk = min(chunk_positions(V), tokens)
    logits = chunk * V * 4 * (LOGITS_COPIES_DISTILL if distill else LOGITS_COPIES)
    slack = ALLOCATOR_SLACK * (trainable + q_bytes + act + logits)
    return MemoryEstimate(weights=weights, gradients=trainable, optimizer=2 * trainable, quantized_copies=q_bytes,
                          teacher=weights if distill else 0, activations=int(act), logits=int(logits),
                          allocator=int(slack), batch=B, seq_len=seq_len, layers=L)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (a container's real ceiling, which
    /proc/meminfo does not show), or None when there is no limit. Usage counts page cache;
    the inactive file pages are reclaimed before the OOM killer acts, so they are not "used"
    (the working-set figure Kubernetes uses)."""
    cgroup = _read("/proc/self/cgroup") or ""
    rel = {}
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            rel[parts[1]] = parts[2].strip().rstrip("/")
    # (limit file, usage file, stat key) for cgroup v2 and v1, in the process's own group first
    layouts = [("/sys/fs/cgroup{}", "memory.max", "memory.current", "inactive_file", rel.get("")),
               ("/sys/fs/cgroup/memory{}", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
                rel.get("memory"))]
    for root, limit_f, usage_f, stat_key, sub in layouts:
        for base in ([root.format(sub)] if sub else []) + [root.format("")]:
            limit, usage = _read(f"{base}/{limit_f}"), _read(f"{base}/{usage_f}")
            if limit is None or usage is None:
                continue
            limit = limit.strip()
            if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes "no limit" as ~2^63
                return None
            inactive = 0
            for line in (_read(f"{base}/memory.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key == stat_key and value.strip().isdigit():
                    inactive = int(value)
            return max(0, int(limit) - (int(usage.strip()) - inactive))
    return None


def available_bytes(device) -> tuple[int, str]:
    """(bytes available, what was measured) on ``device``: free GPU memory on CUDA, else
    available RAM (psutil, or /proc/meminfo's MemAvailable) capped by a cgroup limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in open("/proc/meminfo", encoding="utf-8"):
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except OSError:
            pass
    cg = _cgroup_available()
    if avail is None and cg is None:
        raise MemoryCheckError("cannot read the available memory (no psutil, /proc/meminfo or cgroup): "
                               "pass --ignore-memory-check to train without the check")
    if cg is not None and (avail is None or cg < avail):
        return cg, "available under the container's memory limit"
    return int(avail), "available RAM"


def check_memory(est: MemoryEstimate, device, *, resident: int = 0, local_processes: int = 1,
                 gradient_checkpointing: bool = False) -> None:
    """Refuse (``MemoryCheckError``) a run whose estimated peak does not fit.

    ``resident``: bytes of the estimate already allocated in this process's RAM (the loaded
    model, on CPU), which the available figure no longer includes. On CPU, every process on
    this machine needs its own share of the same RAM.
    """
    avail, what = available_bytes(device)
    on_gpu = torch.device(device).type == "cuda"
    need = est.total - (0 if on_gpu else resident)
    share = 1 if on_gpu else max(1, local_processes)
    if need * share <= avail:
        return
    procs = f" x {share} processes" if share > 1 else ""
    already = f" (of which the loaded model already holds {resident / GiB:.2f} GiB)" if resident and not on_gpu else ""
    hints = "a smaller --batch-size or --seq-len (activations grow with both)"
    if not gradient_checkpointing:
        hints += ", or --gradient-checkpointing"
    raise MemoryCheckError(
        f"this run needs an estimated {est.describe()} per process{already}{procs}, but only "
        f"{avail / GiB:.2f} GiB is {what}: try {hints}; pass --ignore-memory-check to train anyway"
    )


def local_process_count(default: int) -> int:
    """Processes sharing this machine (torchrun / accelerate set LOCAL_WORLD_SIZE)."""
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", default))
    except ValueError:
        return default
