"""Resumable run state, written atomically without pickle.

``<run>/state/`` holds: ``model.safetensors`` (master weights), ``optimizer.safetensors`` +
``trainer.json`` (optimizer tensors and everything JSON-able: step, scalar optimizer state,
param groups, LR schedule, path scheduler, LAA, data order, RNG), and, when the LAA window holds
low-bit gradients, ``grads-rank<r>.safetensors``: the running mean in ``p.grad`` that the next
low-bit step builds on (one file per rank; after synchronised backwards they are equal, but a
rank restores only its own). The folder is replaced as a whole, so a kill
during a save leaves the previous state intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from otaro.errors import OtaroError
from otaro.io import atomic_dir, os_errors_of_safetensors, write_json

# 2: LAA keeps a running *mean* of low-bit gradients in p.grad and updates every step; a
# version-1 state holds an un-applied *sum* from the old delayed-update rule, so it is refused.
STATE_VERSION = 2


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": opt_state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(run_dir: Path, *, model, optimizer, trainer: dict, grads: dict[int, dict[str, torch.Tensor]] | None,
               is_main: bool = True) -> Path:
    """Write ``run_dir/state`` (main process); ``grads`` maps rank -> pending gradients."""
    from safetensors.torch import save_file, save_model

    target = Path(run_dir) / "state"
    if not is_main:
        return target
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state()
    with atomic_dir(target, overwrite=True) as tmp, os_errors_of_safetensors():
        save_model(model, str(tmp / "model.safetensors"))  # handles tied tensors
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for rank, g in (grads or {}).items():
            save_file({k: v.contiguous().cpu() for k, v in g.items()}, str(tmp / f"grads-rank{rank}.safetensors"))
        write_json(tmp / "trainer.json", {"state_version": STATE_VERSION, **trainer, "optimizer": opt_meta, "rng": rng_meta})
    return target


def read_trainer_json(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "state" / "trainer.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OtaroError(f"{path} is corrupt: {e}") from None
    if meta.get("state_version") != STATE_VERSION:
        raise OtaroError(f"{path} is run-state version {meta.get('state_version')!r}; this otaro reads {STATE_VERSION}")
    return meta


def load_state(run_dir: Path, *, model, optimizer, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore model, optimizer and RNG in place; returns (trainer meta, this rank's pending grads)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    state = Path(run_dir) / "state"
    meta = read_trainer_json(run_dir)
    if meta is None:
        raise OtaroError(f"nothing to resume in {run_dir} (no saved state)")
    try:
        missing, unexpected = load_model(model, str(state / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise OtaroError(f"saved weights in {state} do not match the model ({(missing or unexpected)[:3]})")
        opt = _unflatten_optimizer(load_file(str(state / "optimizer.safetensors")), meta["optimizer"])
        optimizer.load_state_dict(opt)
        _set_rng_state(load_file(str(state / "rng.safetensors")), meta["rng"])
        gpath = state / f"grads-rank{rank}.safetensors"
        grads = load_file(str(gpath)) if gpath.is_file() else None
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise OtaroError(f"run state in {state} is unreadable: {e}") from None
    return meta, grads
