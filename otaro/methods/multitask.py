"""Multi-task quantization (LoRA-Inlaid, seed 000): one quantized base shared by several tasks,
each with its own calibration data and its own LoRA adapter (kept unmerged, in float).

Methods (integer formats):

* ``mlgptq`` — per-task Hessians H^t = 2 X^tᵀX^t / N_t, combined by the element-wise max over
  tasks (the research note's reading of "max-aggregated Hessian") on the diagonal, with the pooled
  correlations (``--ml-hessian``, see ``HESSIAN_COMBINATIONS``), then the one GPTQ solver
  (``otaro.methods.gptq.gptq_solve``).
* ``gptq-pooled`` — seed 000's GPTQ_tweaked: the token-weighted mean of the H^t, i.e. ordinary
  GPTQ on the pooled calibration data of all tasks.
* ``mlawq`` — seed 000 Algorithm A: for every ratio α of the grid and every task t a candidate
  scale s_{α,t} = mean|X^t|^α (normalised as in AWQ); per input channel j the candidate with the
  lowest error ‖ΔW[:, j]‖² · E_t[x_j²] (ΔW = W − Q(W·s)/s, on that task's own data) wins, so the
  s is a per-channel mosaic of task scales. Guard (ours): the mosaic is kept only if its summed
  per-task output error Σ_t tr(ΔW H^t ΔWᵀ) is the lowest among it and every single candidate
  s_{α,t} (s = 1 included), else that best candidate is used (the log says how often the mosaic
  won). Clipping uses the combined H, as mlgptq.
* ``awq-pooled`` — seed 000's AWQ_tweaked: pooled mean|x| and pooled H, one α per group chosen by
  the pooled output error of the group's linears.

The task's LoRA is active (peft, unmerged) while its activations are collected, block by block
on the already-quantized prefix; the error is measured as (W − Q) X^t (the adapter term
cancels: M^t − (Q + B^tA^t) X^t = (W − Q) X^t), so adapters act only through X^t. The AWQ
variants fold their scales into norms/linears *and the adapters' factors* (lora_A columns of a
scaled linear, lora_B rows of a linear a scale is folded into): the checkpoint gets the rescaled
adapters under ``adapters/<task>/``, which replace the originals with this base.

**Task statistics** (``--task-stats DIR``): per task one safetensors file with, per block and
distinct linear input, H^t and mean|x| in the block's unscaled frame, plus ``manifest.json``.
A task whose entry matches (model, format, method, adapter files, calibration tokens) is not
re-collected. Caveat (research note §1d): a stored X^t was collected on an upstream prefix
quantized with the task set of *its* run; after adding tasks the prefix is re-quantized and
the stored statistics of the old tasks are stale by that difference. Re-collect everything
(a fresh DIR) for the exact result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from otaro.errors import OtaroError
from otaro.methods import Method, register_method
from otaro.methods.awq import (
    FOLD_RTOL,
    SCALE_GRID,
    InputStats,
    SkipLog,
    activation_scales,
    base_linear,
    check_fold,
    fold_scales,
    input_stats,
    output_error,
    quantize_clipped,
    resolve_scale_groups,
    scaled_error,
    search_linear_alpha,
    set_linear,
)

log = logging.getLogger(__name__)

STATS_VERSION = 1
STATS_MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


# --------------------------------------------------------------------------------------------
# Task specs and their validation (before any work)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    name: str
    adapter: str | None  # PEFT LoRA folder (adapter_config.json + adapter_model.safetensors); None: the bare base
    data: tuple[str, ...]  # calibration data specs, as --calib


def parse_task(spec) -> TaskSpec:
    """``NAME=ADAPTER:DATA`` (DATA: specs as --calib, comma-separated; the first ':' after '='
    ends the adapter path; ``NAME=:DATA`` is a task served by the bare base model, no adapter),
    a ``TaskSpec``, or its dict form (a saved config)."""
    if isinstance(spec, TaskSpec):
        return spec
    if isinstance(spec, dict):
        spec = (spec["name"], spec["adapter"], spec["data"])
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        name, adapter, data = spec
        return TaskSpec(str(name), str(adapter) if adapter else None, (data,) if isinstance(data, str) else tuple(data))
    if not isinstance(spec, str) or "=" not in spec or ":" not in spec.partition("=")[2]:
        raise OtaroError(f"--task {spec!r}: expected NAME=ADAPTER:DATA (a LoRA folder and calibration data)")
    name, _, rest = spec.partition("=")
    adapter, _, data = rest.partition(":")
    parts = tuple(p for p in data.split(",") if p)
    if not name or not parts:
        raise OtaroError(f"--task {spec!r}: expected NAME=ADAPTER:DATA (a LoRA folder and calibration data)")
    return TaskSpec(name, adapter or None, parts)


def _loose_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", Path(str(name).rstrip("/\\")).name.lower())


def read_adapter_config(task: TaskSpec) -> dict:
    folder = Path(task.adapter)
    if not folder.is_dir():
        raise OtaroError(f"task {task.name}: adapter folder {folder} does not exist")
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise OtaroError(f"task {task.name}: {folder} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    if not weights.is_file():
        raise OtaroError(f"task {task.name}: {folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters load)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OtaroError(f"task {task.name}: {cfg_path} is not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise OtaroError(f"task {task.name}: {folder} is a {cfg.get('peft_type')} adapter; only LoRA is supported")
    if cfg.get("use_dora"):
        raise OtaroError(f"task {task.name}: DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise OtaroError(f"task {task.name}: adapters with modules_to_save are not supported")
    return cfg


def check_task_config(config, method) -> tuple[TaskSpec, ...]:
    """The config's tasks, parsed and checked against the files (no model needed): called by
    ``QuantizeConfig`` whenever the method is multi-task or tasks/task_stats are given."""
    from otaro.methods.calib import check_calibration_specs

    tasks = tuple(parse_task(t) for t in ((config.tasks,) if isinstance(config.tasks, str) else config.tasks))
    if not method.multi_task:
        if tasks or config.task_stats:
            multi = ", ".join(n for n, m in _methods().items() if m.multi_task)
            raise OtaroError(f"method {method.name} takes no --task/--task-stats (multi-task methods: {multi})")
        return ()
    if not tasks:
        raise OtaroError(f"method {method.name} needs at least one --task NAME=ADAPTER:DATA")
    if config.calib:
        raise OtaroError(f"method {method.name} takes its calibration data per task (--task NAME=ADAPTER:DATA); "
                         "drop --calib")
    if config.calib_samples < 1:
        raise OtaroError(f"--calib-samples must be at least 1 (got {config.calib_samples})")
    if config.calib_len < 2:
        raise OtaroError(f"--calib-len must be at least 2 tokens (got {config.calib_len})")
    seen = set()
    for t in tasks:
        if not _TASK_NAME.match(t.name):
            raise OtaroError(f"task name {t.name!r}: use letters, digits, '_' or '-' (up to 64)")
        if t.name in seen:
            raise OtaroError(f"task {t.name} is given twice")
        seen.add(t.name)
        check_calibration_specs(t.data)
        if t.adapter is None:
            continue
        cfg = read_adapter_config(t)
        base = cfg.get("base_model_name_or_path")
        if base and _loose_name(base) and _loose_name(config.model):
            a, b = _loose_name(base), _loose_name(config.model)
            if a not in b and b not in a:
                raise OtaroError(f"task {t.name}: adapter {t.adapter} was trained on {base!r}, not {config.model!r} "
                                 f"(if it is the same model, set base_model_name_or_path in its {ADAPTER_CONFIG})")
    return tasks


def _methods():
    from otaro.methods import METHODS

    return METHODS


def check_task_adapters(model, tasks: Sequence[TaskSpec]) -> None:
    """Every LoRA tensor must target a linear of this model with matching shapes (strict)."""
    from safetensors import safe_open

    for t in tasks:
        if t.adapter is None:
            continue
        cfg = read_adapter_config(t)
        path = Path(t.adapter) / ADAPTER_WEIGHTS
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if not shapes:
            raise OtaroError(f"task {t.name}: {path} holds no tensors")
        for key, shape in shapes.items():
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight$", key)
            if not m:
                raise OtaroError(f"task {t.name}: adapter tensor {key} is not a LoRA A/B weight (unsupported)")
            target, part = m.groups()
            try:
                mod = model.get_submodule(target)
            except AttributeError:
                raise OtaroError(f"task {t.name}: adapter targets {target}, which this model does not have") from None
            if not isinstance(mod, nn.Linear):
                raise OtaroError(f"task {t.name}: adapter targets {target}, a {type(mod).__name__} (only linears)")
            want = (None, mod.in_features) if part == "lora_A" else (mod.out_features, None)
            dim = 1 if part == "lora_A" else 0
            if len(shape) != 2 or shape[dim] != want[dim]:
                raise OtaroError(f"task {t.name}: {key} has shape {list(shape)}, but {target} is "
                                 f"{mod.out_features}x{mod.in_features} (an adapter for another model?)")
        r = cfg.get("r")
        ranks = {shape[0] for k, shape in shapes.items() if ".lora_A." in k}
        if r is not None and not cfg.get("rank_pattern") and ranks - {r}:
            raise OtaroError(f"task {t.name}: adapter_config.json says r = {r}, the tensors have ranks {sorted(ranks)}")


# --------------------------------------------------------------------------------------------
# Combining per-task statistics
# --------------------------------------------------------------------------------------------


def _pooled(Hs, ns):
    total = float(sum(ns))
    return sum(H * (n / total) for H, n in zip(Hs, ns))


def _max(Hs, ns):
    return torch.stack(list(Hs)).amax(0)


def nearest_psd(H: torch.Tensor) -> torch.Tensor:
    """The positive semi-definite matrix nearest ``H`` (symmetric) in Frobenius norm: its
    eigen-decomposition with the negative eigenvalues set to 0 (Higham 1988), in float64."""
    Hd = H.to(torch.float64)
    vals, vecs = torch.linalg.eigh((Hd + Hd.T) / 2)
    return ((vecs * vals.clamp(min=0)) @ vecs.T).to(H.dtype)


def _max_psd(Hs, ns):
    return nearest_psd(_max(Hs, ns))


def _diag_max(Hs, ns):
    # the pooled Hessian's correlation structure, rescaled so its diagonal is the per-channel max
    # curvature over tasks: D^½ C D^½ with C = diag(P)^-½ P diag(P)^-½, a congruence of a PSD matrix
    P = _pooled(Hs, ns).to(torch.float64)
    d = torch.diagonal(P)
    m = torch.stack([torch.diagonal(H) for H in Hs]).amax(0).to(torch.float64)
    r = torch.where(d > 0, (m / d.clamp(min=1e-30)).sqrt(), torch.zeros_like(d))
    return (P * r[:, None] * r[None, :]).to(Hs[0].dtype)


# How per-task Hessians are combined. Seed 000 says "max-aggregated Hessian" and no more; the
# element-wise max of PSD matrices need not be PSD (on SmolLM2's two tasks it never was: GPTQ's
# damping escalated to 10-100x the mean diagonal in most linears, which switches its error
# feedback off). "max-psd" keeps the max and projects it onto the PSD cone; "diag-max" (the
# default) keeps the max only on the diagonal, each channel's own curvature, and the pooled
# correlations elsewhere. benchmarks/int_ptq.py measures the three; on its two tasks only
# diag-max beat pooled GPTQ (max and max-psd lost to it).
HESSIAN_COMBINATIONS = {
    "max-psd": _max_psd,
    "max": _max,
    "diag-max": _diag_max,
    "pooled": _pooled,
}
ML_HESSIANS = ("diag-max", "max-psd", "max")  # the choices of --ml-hessian


def combine_hessians(Hs: Sequence[torch.Tensor], ns: Sequence[int], mode: str) -> torch.Tensor:
    """One H from per-task H^t (token counts ``ns``) by ``HESSIAN_COMBINATIONS[mode]``: ``max``
    element-wise (the literal reading of MLGPTQ), ``max-psd`` that projected onto the PSD cone,
    ``diag-max`` pooled correlations with the max diagonal, ``pooled`` Σ N_t H^t / Σ N_t (the
    Hessian of the pooled tokens, GPTQ_tweaked)."""
    try:
        fn = HESSIAN_COMBINATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown combination {mode!r}") from None
    return fn(list(Hs), list(ns))


def pooled_stats(stats: Sequence[InputStats]) -> InputStats:
    total = sum(s.n for s in stats)
    return InputStats(sum(s.absmean * (s.n / total) for s in stats), combine_hessians([s.H for s in stats],
                      [s.n for s in stats], "pooled"), total)


def mosaic_scales(Ws: Sequence[torch.Tensor], stats: Sequence[InputStats], fmt,
                  grid: Sequence[float] = SCALE_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 000 Algorithm A (MLAWQ): per input channel j, the scale of the candidate (α, t) with
    the smallest per-channel error ‖ΔW_{α,t}[:, j]‖² · E_t[x_j²] (summed over the group's
    linears; E_t[x_j²] = H^t_jj / 2). Returns (s, choice [d, 2] = (grid index, task index)).
    Ties keep the first candidate in (α, task) order."""
    Ws = [W.to(torch.float32) for W in Ws]
    d = Ws[0].shape[1]
    best_err = torch.full((d,), float("inf"), dtype=torch.float64)
    best_s = torch.ones(d, dtype=torch.float32)
    choice = torch.zeros(d, 2, dtype=torch.long)
    for a, alpha in enumerate(grid):
        for t, st in enumerate(stats):
            s = activation_scales(st.absmean, alpha)
            col = sum((D.double() ** 2).sum(0) for D in scaled_error(Ws, s, fmt))
            err = col * (torch.diagonal(st.H).double() / 2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            choice[better] = torch.tensor([a, t])
    return best_s, choice


def multitask_error(Ws, s, stats: Sequence[InputStats], fmt) -> float:
    """Σ_t Σ_linears tr(ΔW H^t ΔWᵀ) at scale s (each task weighted equally)."""
    Ds = scaled_error([W.to(torch.float32) for W in Ws], s, fmt)
    return sum(output_error(D, st.H) for st in stats for D in Ds)


def mlawq_scales(Ws, stats: Sequence[InputStats], fmt, grid: Sequence[float] = SCALE_GRID) -> tuple[torch.Tensor, bool]:
    """MLAWQ's scale for one group: Algorithm A's per-channel mosaic, kept if its summed per-task
    output error is the lowest among it and every single candidate s_{α,t} (α = 0: s = 1);
    otherwise the best single candidate (ours: the mosaic ignores that channels share a group
    scale, and on the tiny test models it lost to s = 1 in most groups). Returns (s, mosaic won)."""
    mosaic, _ = mosaic_scales(Ws, stats, fmt, grid)
    best_s, best_err, won = mosaic, multitask_error(Ws, mosaic, stats, fmt), True
    for alpha in grid:
        for st in stats:
            s = activation_scales(st.absmean, alpha)
            err = multitask_error(Ws, s, stats, fmt)
            if err < best_err:
                best_s, best_err, won = s, err, False
            if alpha == 0:
                break  # s = 1 for every task
    return best_s, won


# --------------------------------------------------------------------------------------------
# Task statistics on disk
# --------------------------------------------------------------------------------------------


def task_signature(config, model, task: TaskSpec, windows: torch.Tensor) -> dict:
    """What a task's statistics depend on besides the prefix (see the caveat in the module doc)."""
    from otaro.io import sha256_file as _sha256

    folder = Path(task.adapter) if task.adapter else None
    return {
        "stats_version": STATS_VERSION,
        "model": str(config.model),
        "model_type": model.config.model_type,
        "format": config.format,
        "method": config.method,
        "adapter_sha256": _sha256(folder / ADAPTER_WEIGHTS) if folder else None,
        "adapter_config_sha256": _sha256(folder / ADAPTER_CONFIG) if folder else None,
        "calibration_sha256": hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest(),
        "calibration_shape": list(windows.shape),
    }


class TaskStatsStore:
    """``DIR/manifest.json`` + ``DIR/<task>.safetensors`` (see the module doc)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OtaroError(f"--task-stats {self.folder} is not a folder")
        mpath = self.folder / STATS_MANIFEST
        self.manifest = {"otaro_task_stats": STATS_VERSION, "tasks": {}}
        if mpath.is_file():
            try:
                m = json.loads(mpath.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise OtaroError(f"{mpath} is not valid JSON ({e}); remove it or use another --task-stats") from None
            if m.get("otaro_task_stats") != STATS_VERSION:
                raise OtaroError(f"{mpath}: task statistics version {m.get('otaro_task_stats')}, "
                                 f"this otaro reads {STATS_VERSION}")
            self.manifest = m

    def lookup(self, task: TaskSpec, signature: dict) -> Path | None:
        entry = self.manifest["tasks"].get(task.name)
        if not entry or entry.get("signature") != signature:
            return None
        path = self.folder / entry["file"]
        return path if path.is_file() else None

    def write(self, task: TaskSpec, signature: dict, tensors: dict, layout: dict, prefix_tasks: Sequence[str]):
        from safetensors.torch import save_file

        from otaro.io import write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{task.name}.safetensors"
        tmp = self.folder / f".{name}.partial"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"otaro_task_stats": json.dumps(layout)})
        tmp.replace(self.folder / name)
        self.manifest["tasks"][task.name] = {
            "file": name, "adapter": task.adapter, "data": list(task.data), "signature": signature,
            # the task set whose quantized prefix these statistics were collected on
            "prefix_tasks": list(prefix_tasks),
        }
        write_json(self.folder / STATS_MANIFEST, self.manifest)


class _StoredTask:
    """Read one task's stored statistics block by block."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._f = safe_open(str(path), "pt")
        meta = self._f.metadata() or {}
        self.layout = json.loads(meta.get("otaro_task_stats", "{}"))

    def block(self, i: int, rels: Sequence[str]) -> dict[str, InputStats]:
        shared: dict[str, InputStats] = {}
        out = {}
        for rel in rels:
            key = self.layout["inputs"].get(f"{i}.{rel}")
            if key is None:
                raise OtaroError(f"stored task statistics have no entry for block {i} {rel}; use a fresh --task-stats")
            if key not in shared:
                shared[key] = InputStats(self._f.get_tensor(f"{key}.absmean"), self._f.get_tensor(f"{key}.H"),
                                         int(self.layout["tokens"][key]))
            out[rel] = shared[key]
        return out


def _serialize_block(i: int, stats: dict[str, InputStats], tensors: dict, layout: dict) -> None:
    keys: dict[int, str] = {}
    for rel, st in stats.items():
        key = keys.setdefault(id(st), f"{i}.{rel}")
        layout["inputs"][f"{i}.{rel}"] = key
        if key == f"{i}.{rel}":
            tensors[f"{key}.H"] = st.H.detach().cpu().clone()
            tensors[f"{key}.absmean"] = st.absmean.detach().cpu().clone()
            layout["tokens"][key] = st.n


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class _Adapters:
    """The tasks' LoRA adapters attached with peft (unmerged); ``activate(task)`` switches to a
    task's adapter, or to the bare base for a task without one."""

    def __init__(self, model, tasks: Sequence[TaskSpec]):
        self.pm = None
        with_adapter = [t for t in tasks if t.adapter]
        if not with_adapter:
            return
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover - peft is a dependency
            raise OtaroError("multi-task methods need peft: pip install 'otaro[multitask]' (or 'peft>=0.13')") from None
        first = with_adapter[0]
        self.pm = PeftModel.from_pretrained(model, first.adapter, adapter_name=first.name, is_trainable=False)
        for t in with_adapter[1:]:
            self.pm.load_adapter(t.adapter, adapter_name=t.name, is_trainable=False)
        self.pm.eval()

    def activate(self, task: TaskSpec) -> None:
        if self.pm is None:
            return
        if task.adapter is None:
            self.pm.base_model.disable_adapter_layers()
        else:
            self.pm.base_model.enable_adapter_layers()
            self.pm.set_adapter(task.name)

    def state(self, task: TaskSpec) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.pm, adapter_name=task.name)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def remove(self, model) -> None:
        if self.pm is None:
            return
        self.pm.base_model.enable_adapter_layers()
        self.pm.unload()  # the base layers (now quantized) go back in place of the LoRA wrappers
        if hasattr(model, "peft_config"):
            delattr(model, "peft_config")


@dataclass(frozen=True)
class _Kind:
    solver: str  # "gptq" | "awq"
    combine: str  # "max" (mlgptq/mlawq: the combination config.ml_hessian names) | "pooled"


KINDS = {
    "mlgptq": _Kind("gptq", "max"),
    "gptq-pooled": _Kind("gptq", "pooled"),
    "mlawq": _Kind("awq", "max"),
    "awq-pooled": _Kind("awq", "pooled"),
}


@torch.no_grad()
def run_multitask(kind: str, model, fmt, config, calibration: dict, progress=None):
    """Quantize ``model`` in place for the tasks of ``config`` (``calibration``: task name ->
    windows). The result looks like ``convert``'s; for the AWQ kinds ``model.otaro_task_adapters``
    holds the rescaled adapter tensors (written by ``after_save``)."""
    from otaro.arch import get_adapter, get_layers
    from otaro.methods.calib import capture_layer_inputs, run_layer
    from otaro.methods.gptq import gptq_solve, quantizer_factory
    from otaro.modules import QuantInfo, attach

    spec = KINDS[kind]
    tasks = tuple(config.tasks)
    if not tasks and isinstance(calibration, torch.Tensor):  # plain windows: one task, the bare base
        tasks, calibration = (TaskSpec("calib", None, tuple(config.calib)),), {"calib": calibration}
    if not tasks or not isinstance(calibration, dict) or set(calibration) != {t.name for t in tasks}:
        raise OtaroError(f"{kind} needs calibration windows for each task")
    # one task: every combination is its own H (pooled skips the work)
    mode = spec.combine if spec.combine == "pooled" or len(tasks) == 1 else getattr(config, "ml_hessian", "diag-max")
    if fmt.family != "int":
        raise OtaroError(f"{kind} produces integer formats only (got {fmt.name})")
    factory = quantizer_factory(fmt) if spec.solver == "gptq" else None
    adapter = get_adapter(model)
    if getattr(model, "otaro", None) is not None:
        raise OtaroError("model is already quantized")
    check_task_adapters(model, tasks)  # strict shapes: before any forward pass
    if config.task_stats:
        from otaro.io import check_writable_output

        check_writable_output(config.task_stats)  # written at the end: fail now, not after the work

    store = TaskStatsStore(config.task_stats) if config.task_stats else None
    signatures = {t.name: task_signature(config, model, t, calibration[t.name]) for t in tasks} if store else {}
    stored = {t.name: store.lookup(t, signatures[t.name]) for t in tasks} if store else {}
    reuse = [t for t in tasks if stored.get(t.name)]
    collect = [t for t in tasks if not stored.get(t.name)]
    log.info("%s: collecting statistics of %s; reusing %s", kind,
             ", ".join(t.name for t in collect) or "no task",
             ", ".join(f"{t.name} (from {stored[t.name]})" for t in reuse) or "none")
    readers = {t.name: _StoredTask(stored[t.name]) for t in reuse}

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ad = _Adapters(model, tasks)
    try:
        layers = get_layers(model, adapter)
        hidden, extras = {}, {}
        for t in collect:
            ad.activate(t)
            hidden[t.name], extras[t.name] = capture_layer_inputs(model, layers, calibration[t.name].to(device))
        probe = None
        if spec.solver == "awq":  # one window through the quantized prefix, to check each fold
            ad.activate(tasks[0])
            probe = capture_layer_inputs(model, layers, calibration[tasks[0].name][:1].to(device))
        new = {t.name: ({}, {"inputs": {}, "tokens": {}}) for t in collect}
        names: list[str] = []
        skips = SkipLog(kind)
        order = [t.name for t in tasks]
        by_name = {t.name: t for t in tasks}
        for i, layer in enumerate(layers):
            prefix = f"{adapter.layers_path}.{i}"
            rels = adapter.linear_names
            for rel in rels:
                if not isinstance(base_linear(layer.get_submodule(rel)), nn.Linear):
                    raise OtaroError(f"{prefix}.{rel} is {type(base_linear(layer.get_submodule(rel))).__name__}, "
                                     "expected nn.Linear")
            per_task: dict[str, dict[str, InputStats]] = {}
            for t in collect:
                ad.activate(t)
                per_task[t.name], _ = input_stats(layer, rels, hidden[t.name], extras[t.name][i])
                _serialize_block(i, per_task[t.name], *new[t.name])
            for t in reuse:
                per_task[t.name] = readers[t.name].block(i, rels)

            if spec.solver == "awq":
                _scale_block(ad, by_name, layer, adapter, model.config, per_task, order, spec, fmt, probe, i, skips)

            combined: dict[tuple, torch.Tensor] = {}
            for rel in rels:
                lin = base_linear(layer.get_submodule(rel))
                sts = [per_task[n][rel] for n in order]
                key = tuple(id(st) for st in sts)  # q/k/v (gate/up) share their input statistics
                if key not in combined:
                    combined[key] = combine_hessians([s.H for s in sts], [s.n for s in sts], mode)
                H = combined[key]
                if spec.solver == "gptq":
                    W = lin.weight.detach().to(torch.float32)
                    quantizer = factory(fmt, config)
                    gptq_solve(W, H, quantizer, block_size=config.block_size, damp=config.damp,
                               act_order=config.act_order)
                    module = quantizer.build(lin)
                else:
                    module = quantize_clipped(lin, H, fmt)
                set_linear(layer, rel, module)
                names.append(f"{prefix}.{rel}")
                if progress:
                    progress(names[-1])
            attach(model, QuantInfo(fmt, adapter.name, tuple(names)))
            if i + 1 < len(layers):
                for t in collect:
                    ad.activate(t)
                    hidden[t.name] = run_layer(layer, hidden[t.name], extras[t.name][i])
                if probe is not None:
                    ad.activate(tasks[0])
                    probe = (run_layer(layer, probe[0], probe[1][i]), probe[1])
        skips.emit()
        rescaled = None
        if spec.solver == "awq":
            rescaled = {t.name: ad.state(t) for t in tasks if t.adapter}
    finally:
        ad.remove(model)
    model.train(was_training)
    if store:
        for t in collect:
            store.write(t, signatures[t.name], *new[t.name], prefix_tasks=order)
    model.otaro_tasks = {"method": config.method, "tasks": [
        {"name": t.name, "adapter": t.adapter, "data": list(t.data),
         "statistics": "reused" if t in reuse else "collected",
         **({"stats_prefix_tasks": store.manifest["tasks"][t.name]["prefix_tasks"]} if store else {})}
        for t in tasks]}
    if rescaled:
        model.otaro_task_adapters = {t.name: (t.adapter, rescaled[t.name]) for t in tasks if t.adapter}
    return model


def _scale_block(ad, by_name, layer, adapter, config, per_task, order, spec, fmt, probe, i, skips) -> None:
    """Search, fold and check every scale group of one block; rescales the stats in place."""
    from otaro.methods.calib import run_layer

    groups, skipped = resolve_scale_groups(layer, adapter, config)
    hidden, extra = probe[0], probe[1][i]

    def activate(name):
        return lambda: ad.activate(by_name[name])

    probes = [(activate(n), hidden, extra) for n in order]
    mosaic_won: list[bool] = []
    refs = []
    for act, h, e in probes:
        act()
        refs.append(run_layer(layer, h, e))
    for group in groups:
        sts = [per_task[n][group.linears[0]] for n in order]
        if any(per_task[n][rel] is not per_task[n][group.linears[0]] for n in order for rel in group.linears):
            skipped.append((group.name, "its linears do not read one tensor"))
            continue
        Ws = [base_linear(m).weight.detach() for m in group.modules]
        if spec.combine == "pooled":
            alpha, _ = search_linear_alpha(Ws, pooled_stats(sts), fmt)
            s = activation_scales(pooled_stats(sts).absmean, alpha)
        else:
            s, won = mlawq_scales(Ws, sts, fmt)
            mosaic_won.append(won)
        undo = fold_scales(group, s)
        change = check_fold(layer, probes, refs)
        if change > FOLD_RTOL:
            undo()
            skipped.append((group.name, f"folding changes the float block output by {change:.2g} "
                                        "(the layout differs from the adapter's scale_groups)"))
            continue
        for n in order:
            scaled = per_task[n][group.linears[0]].scaled(s)
            for rel in group.linears:
                per_task[n][rel] = scaled
    skips.add(i, skipped)
    if mosaic_won:
        log.info("mlawq block %d: the per-channel mosaic won in %d of %d scale groups", i, sum(mosaic_won),
                 len(mosaic_won))


def save_task_outputs(model, path) -> None:
    """``after_save`` of the multi-task methods: ``tasks.json`` (which statistics were collected
    or reused) and, for the AWQ kinds, the rescaled adapters under ``adapters/<task>/``."""
    import shutil

    from safetensors.torch import save_file

    from otaro.io import write_json

    path = Path(path)
    info = getattr(model, "otaro_tasks", None)
    adapters = getattr(model, "otaro_task_adapters", None)
    if info is None:
        return
    if adapters:
        for name, (src, state) in adapters.items():
            out = path / "adapters" / name
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(src) / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
        info = {**info, "adapters": {n: f"adapters/{n}" for n in adapters},
                "note": "AWQ scales were folded into the adapters' factors too: use adapters/<task> with this base"}
    write_json(path / "tasks.json", info)
    for attr in ("otaro_tasks", "otaro_task_adapters"):
        if hasattr(model, attr):
            delattr(model, attr)


_DESCRIPTIONS = {
    "mlgptq": "MLGPTQ (LoRA-Inlaid): GPTQ on the element-wise max of per-task Hessians (--task, each with its LoRA)",
    "gptq-pooled": "GPTQ_tweaked: GPTQ on the pooled calibration data of all --task entries (each with its LoRA)",
    "mlawq": "MLAWQ (LoRA-Inlaid): AWQ with a per-channel mosaic of per-task scales (--task, each with its LoRA)",
    "awq-pooled": "AWQ_tweaked: AWQ on the pooled calibration data of all --task entries (each with its LoRA)",
}

for _name in KINDS:
    register_method(
        Method(
            _name,
            _DESCRIPTIONS[_name],
            families=("int",),
            needs_calibration=True,
            run=lambda model, fmt, config, calibration, progress=None, _k=_name: run_multitask(
                _k, model, fmt, config, calibration, progress),
            multi_task=True,
            after_save=save_task_outputs,
        )
    )
