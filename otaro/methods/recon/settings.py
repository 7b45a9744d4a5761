"""Validation and method defaults of the block-reconstruction options of ``QuantizeConfig``.

Called from ``QuantizeConfig.__post_init__`` (before any model is loaded). Values are range-checked
first; other methods refuse the options when changed from their defaults (as qslaw's are); for
the reconstruction methods the options left at None get the method's default, so the manifest
records what actually ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from otaro.errors import OtaroError


@dataclass(frozen=True)
class MethodDefaults:
    policy: str  # window policy of the driver (otaro.methods.recon.driver.plan_windows)
    blocks: int  # n of LA-n / MB-n
    iters: int | None  # SignSGD steps per window; None: the method trains by epochs (lsi)
    batch: int  # calibration windows per step
    lr: float | None  # None: 1 / iters (SignRound's rule, lr·iters/2 = 0.5 bounds V)


# sb/la/mb (seed 001): 200 steps is SignRound's original budget and modest on a CPU (the paper's
# main runs use 1000 with lr 1e-3, same lr·iters); batch 8 as the paper. la/mb default to n = 2,
# the paper's practical advice (gains saturate at 2 blocks). lsi (seed 004): AdamW lr 2e-4 and
# OmniQuant's one window per step (its "epochs" are passes over the samples one at a time).
DEFAULTS: dict[str, MethodDefaults] = {
    "sb": MethodDefaults("sb", 1, 200, 8, None),
    "la": MethodDefaults("la", 2, 200, 8, None),
    "mb": MethodDefaults("mb", 2, 200, 8, None),
    "lsi": MethodDefaults("sb", 1, None, 1, 2e-4),
}


# The fields' values when not given (QuantizeConfig's defaults).
UNSET = {"recon_blocks": None, "recon_iters": None, "recon_lr": None, "recon_batch": None, "lsi_epochs": 2,
         "lsi_k": 0}


def _at_least(value, low: int, option: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise OtaroError(f"{option} must be an integer of at least {low} (got {value!r})")


def resolve_recon_options(config, method: str | None = None) -> dict:
    """The reconstruction fields of ``config`` with the defaults of ``method`` (default: the
    config's) filled in, an empty dict for other methods; raises a one-line OtaroError on a bad
    value. The methods call it again themselves, so a config built without validation (tests,
    benchmarks) runs with the same defaults."""
    method = config.method if method is None else method
    _at_least(config.recon_blocks, 1, "--recon-blocks")
    _at_least(config.recon_iters, 1, "--recon-iters")
    _at_least(config.recon_batch, 1, "--recon-batch")
    _at_least(config.lsi_epochs, 1, "--lsi-epochs")
    _at_least(config.lsi_k, 0, "--lsi-k")
    lr = config.recon_lr
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise OtaroError(f"--recon-lr must be a positive number (got {lr!r})")
    d = DEFAULTS.get(method)
    given = [f"--{k.replace('_', '-')}" for k, default in UNSET.items() if getattr(config, k) != default]
    if d is None:
        if given:
            raise OtaroError(f"method {method} has no block-reconstruction options; drop {', '.join(given)}")
        return {}
    lsi_only = [o for o in given if o.startswith("--lsi-")]
    if method != "lsi" and lsi_only:
        raise OtaroError(f"{', '.join(lsi_only)} only apply to --method lsi")
    blocks = d.blocks if config.recon_blocks is None else config.recon_blocks
    if d.policy == "sb" and blocks != 1:
        raise OtaroError(f"{method} reconstructs one block against its own output; "
                         f"--recon-blocks {blocks} needs --method la or mb")
    if d.iters is None and config.recon_iters is not None:
        raise OtaroError(f"{method} trains for --lsi-epochs passes over the calibration windows; "
                         "drop --recon-iters")
    iters = None if d.iters is None else (config.recon_iters or d.iters)
    if lr is None:
        lr = d.lr if d.lr is not None else 1.0 / iters
    return {"recon_blocks": blocks, "recon_iters": iters, "recon_lr": float(lr),
            "recon_batch": config.recon_batch or d.batch}
