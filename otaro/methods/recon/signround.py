"""``sb``, ``la``, ``mb``: SignRound block reconstruction over windows of decoder blocks (seed 001).

Every quantized linear gets learnable rounding offsets V (shape of W, init 0) and per-group
clipping factors (init 1) — :mod:`otaro.methods.recon.quantizers` — optimised with SignSGD and
a linear lr decay (:class:`~otaro.methods.recon.driver.SignSGD`), window by window:

* ``sb``: each block against its own fp output (SB-PTQ = LA-1 = MB-1);
* ``la``: LA-n, block k tuned with the loss at block min(k+n-1, L-1), the blocks in between
  fp and frozen (``--recon-blocks n``, default 2);
* ``mb``: MB-n, blocks k..k+n-1 tuned jointly, non-overlapping windows (default n = 2).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from otaro.errors import OtaroError
from otaro.methods import Method, register_method
from otaro.methods.recon.driver import ReconSettings, SignSGD, reconstruct
from otaro.methods.recon.quantizers import make_fake_quant
from otaro.methods.recon.settings import resolve_recon_options


class SignRoundLinear(nn.Module):
    """A linear with a SignRound fake-quantized weight (the fp weight itself is frozen)."""

    def __init__(self, linear: nn.Linear, fmt, targets=(), scale_search: bool = False):
        super().__init__()
        self._source = (linear,)  # kept out of the module tree: only V and the clipping learn
        W = linear.weight.detach().to(torch.float32)
        self.register_buffer("weight_fp", W)
        self.bias = linear.bias
        self.quant = make_fake_quant(fmt, tuple(W.shape), rounding=True, device=W.device)
        self.quant.start_clip(W, targets, scale_search)  # pow2 SEFP: the searched exponent
        self._w: torch.Tensor | None = None

    def refresh(self, bits: int | None) -> None:
        self._w = self.quant(self.weight_fp, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def project_(self) -> None:
        self.quant.project_()

    def build(self) -> nn.Module:
        return self.quant.build(self._source[0], self.weight_fp)


def settings_from(opts: dict, policy: str, n_windows: int, seed: int) -> ReconSettings:
    return ReconSettings(policy=policy, blocks=opts["recon_blocks"], steps=opts["recon_iters"],
                         batch=min(opts["recon_batch"], n_windows), seed=seed)


def run_signround(model, fmt, config, calibration, progress=None, *, policy: str, observer=None):
    """Block reconstruction with SignRound under window ``policy`` ("sb" | "la" | "mb")."""
    from otaro.methods.calib import streams_for
    from otaro.methods.sefp_quantizer import scale_search_enabled, target_weights

    if calibration is None:
        raise OtaroError(f"{policy} needs calibration data (--calib)")
    make_fake_quant(fmt, (1, fmt.group_size), rounding=True)  # an unsupported family fails now
    opts = resolve_recon_options(config, policy)
    settings = settings_from(opts, policy, calibration.shape[0], config.calib_seed)

    def make_optimizer(tunables, steps):
        params = [p for t in tunables for p in (*t.quant.round_params(), *t.quant.clip_params())]
        return SignSGD(params, opts["recon_lr"], steps)  # minmax lr = lr, as the paper

    targets, search = target_weights(fmt, config), scale_search_enabled(config)
    reconstruct(model, fmt, calibration, streams_for(fmt, config), settings,
                lambda name, linear: SignRoundLinear(linear, fmt, targets, search), make_optimizer,
                progress=progress, observer=observer)
    return model


def _runner(policy: str):
    def run(model, fmt, config, calibration, progress=None):
        return run_signround(model, fmt, config, calibration, progress, policy=policy)

    run.__name__ = f"run_{policy}"
    return run


_DESCRIPTIONS = {
    "sb": "SignRound block reconstruction (seed 001 SB-PTQ): learned rounding offsets + group clipping per "
          "decoder block, SignSGD against its fp output (SEFP: λ-weighted over --bits)",
    "la": "look-ahead SignRound, LA-n (--recon-blocks n, default 2): block k tuned, loss n-1 fp frozen blocks later",
    "mb": "multi-block SignRound, MB-n (--recon-blocks n, default 2): n blocks tuned jointly, windows not overlapping",
}
for _name, _text in _DESCRIPTIONS.items():
    register_method(Method(_name, _text, families=("int", "sefp"), needs_calibration=True, run=_runner(_name),
                           target_bits=True))
