"""``lsi``: learnable singular-value increments, trained block by block, merged, quantized (seed 004).

Each quantized linear W (thin SVD W = U diag(S) Vh, r = min(out, in)) is re-parameterised as

    W'(I', P) = U · (diag(S + I') + [P 0; 0 0]) · Vh  =  W + U · (diag(I') + [P 0; 0 0]) · Vh

with I' ∈ R^r (init 0) and an optional dense k×k P on the leading singular directions
(``--lsi-k``, init 0; 0 = no P). The second form is the one computed: it equals the first in
exact arithmetic and is *bit-exactly* W at the start, whereas U diag(S) Vh rebuilds W only to
fp32 rounding. W' goes through the same learnable-clipping fake quantizer as SignRound
(``otaro.methods.recon.quantizers``, no rounding offsets: LSI quantizes by RTN), against the fp
block output, with the multi-bit SEFP objective of the driver. Optimiser: AdamW, weight decay
0, lr 2e-4 (``--recon-lr``) for I' and P; the clipping factors have their own lr (below).

Then W' is merged into a plain weight and RTN-coded with the learned clipping (``build``): the
saved model has exactly RTN's tensors, and inference costs nothing extra.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from otaro.errors import OtaroError
from otaro.methods import Method, register_method
from otaro.methods.recon.driver import ReconSettings, reconstruct, steps_for_epochs
from otaro.methods.recon.quantizers import make_fake_quant
from otaro.methods.recon.settings import resolve_recon_options

# lr of the clipping factors under AdamW (which moves a parameter by about lr per step). The
# paper keeps OmniQuant's LWC, trained at 1e-2 on sigmoid logits initialised at 4 (σ' ≈ 0.018:
# ~2e-4 per step on the factor itself), and does not say whether LWC keeps training under LSI.
# Ours: SignRound's own lr for its clipping factors (200 steps at 5e-3). On the tiny test models
# (80 steps per block) it gave 0.59 of RTN's error at int4 where 1e-3 gave 0.74.
CLIP_LR = 5e-3


class LSILinear(nn.Module):
    def __init__(self, linear: nn.Linear, fmt, k: int, targets=(), scale_search: bool = False):
        super().__init__()
        self._source = (linear,)  # kept out of the module tree
        W = linear.weight.detach().to(torch.float32)
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        r = U.shape[1]
        self.k = min(int(k), r)
        self.register_buffer("weight_fp", W)
        self.register_buffer("U", U)
        self.register_buffer("Vh", Vh)
        self.bias = linear.bias
        self.increment = nn.Parameter(torch.zeros(r, device=W.device))  # I'
        self.block = nn.Parameter(torch.zeros(self.k, self.k, device=W.device)) if self.k else None  # P
        self.quant = make_fake_quant(fmt, tuple(W.shape), rounding=False, device=W.device)
        self.quant.start_clip(W, targets, scale_search)  # pow2 SEFP: the searched exponent
        self._w: torch.Tensor | None = None

    def svd_params(self) -> list[nn.Parameter]:
        return [self.increment] + ([] if self.block is None else [self.block])

    def merged(self) -> torch.Tensor:
        """W' = W + U (diag(I') + P̃) Vh (exactly W while I' = 0 and P = 0)."""
        delta = (self.U * self.increment) @ self.Vh
        if self.block is not None:
            delta = delta + self.U[:, : self.k] @ self.block @ self.Vh[: self.k]
        return self.weight_fp + delta

    def refresh(self, bits: int | None) -> None:
        self._w = self.quant(self.merged(), bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def project_(self) -> None:
        self.quant.project_()

    @torch.no_grad()
    def build(self) -> nn.Module:
        return self.quant.build(self._source[0], self.merged())


def run_lsi(model, fmt, config, calibration, progress=None, observer=None):
    from otaro.methods.calib import streams_for
    from otaro.methods.sefp_quantizer import scale_search_enabled, target_weights

    if calibration is None:
        raise OtaroError("lsi needs calibration data (--calib)")
    make_fake_quant(fmt, (1, fmt.group_size), rounding=False)  # an unsupported family fails now
    opts = resolve_recon_options(config, "lsi")
    n = calibration.shape[0]
    batch = min(opts["recon_batch"], n)
    steps = steps_for_epochs(config.lsi_epochs, n, batch)
    settings = ReconSettings(policy="sb", blocks=1, steps=steps, batch=batch, seed=config.calib_seed)

    def make_optimizer(tunables, steps):
        return torch.optim.AdamW(
            [{"params": [p for t in tunables for p in t.svd_params()], "lr": opts["recon_lr"]},
             {"params": [p for t in tunables for p in t.quant.clip_params()], "lr": CLIP_LR}],
            weight_decay=0.0)

    targets, search = target_weights(fmt, config), scale_search_enabled(config)
    reconstruct(model, fmt, calibration, streams_for(fmt, config), settings,
                lambda name, linear: LSILinear(linear, fmt, config.lsi_k, targets, search), make_optimizer,
                progress=progress, observer=observer)
    return model


register_method(
    Method(
        "lsi",
        "LSI (seed 004): learnable singular-value increments (+ a k×k block, --lsi-k) and group clipping per "
        "block, AdamW against fp block outputs, merged into the weight and RTN-coded (SEFP: λ-weighted over --bits)",
        families=("int", "sefp"),
        needs_calibration=True,
        run=run_lsi,
        target_bits=True,
    )
)
