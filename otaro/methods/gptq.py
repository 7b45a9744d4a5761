"""GPTQ (Frantar et al., 2022): the one solver of the project, shared by every format family.

The solver quantizes a weight column by column in the order of an upper Cholesky factor of
H⁻¹ and feeds each column's error back into the columns not yet quantized, so the layer output
``W X`` (not the weights) is what stays close. It knows nothing about number formats: a
``ColumnQuantizer`` (one per format family, registered in ``QUANTIZERS``) picks the codes of a
column and says which value the error feedback uses. Integer formats register theirs in
``otaro.methods.int_quantizer``; SEFP's multi-bit quantizer registers in
``otaro.methods.sefp_quantizer``.

Layers as in the original code: quantizer (format) → ``gptq_solve`` (algorithm) →
``otaro.methods.calib`` (model driver) → the checkpoint.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from otaro.errors import OtaroError
from otaro.methods import Method, register_method


class ColumnQuantizer(Protocol):
    """What ``gptq_solve`` needs from a format; one instance quantizes one linear."""

    group_size: int

    def prepare(self, W: torch.Tensor, static_groups: bool) -> None:
        """``W``: fp32 [out, in], original column order (dead columns already zeroed).
        ``static_groups`` (always with act-order): fix every group's parameters from ``W`` now."""

    def start_group(self, g: int, Wg: torch.Tensor) -> None:
        """Only without static groups: the sweep reached group ``g``'s first column; ``Wg`` is the
        group's columns [out, <= G] as they are now, error feedback included."""

    def quantize_column(self, j: int, w: torch.Tensor) -> torch.Tensor:
        """``j``: original column index; ``w``: its current values [out] fp32. Record the codes and
        return the value the error feedback uses ([out] fp32)."""

    def build(self, linear: torch.nn.Linear) -> torch.nn.Module:
        """The packed quantized layer from the recorded codes (bias taken from ``linear``)."""


QuantizerFactory = Callable[[object, object], ColumnQuantizer]  # (fmt, QuantizeConfig) -> quantizer
QUANTIZERS: dict[str, QuantizerFactory] = {}


def register_quantizer(family: str, factory: QuantizerFactory) -> QuantizerFactory:
    if family in QUANTIZERS:
        raise ValueError(f"column quantizer for {family!r} registered twice")
    QUANTIZERS[family] = factory
    return factory


def quantizer_factory(fmt) -> QuantizerFactory:
    try:
        return QUANTIZERS[fmt.family]
    except KeyError:
        have = ", ".join(sorted(QUANTIZERS)) or "none"
        raise OtaroError(f"gptq has no column quantizer for {fmt.family} formats ({fmt.name}) in this build; "
                         f"it can produce: {have}") from None


# A failed Cholesky (H not positive definite in floating point: few samples, duplicated
# features) is retried with ten times the damping, as AutoGPTQ does, a bounded number of times.
_DAMP_RETRIES = 4


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), in float64; the damping
    fraction actually used comes back with it."""
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        damp *= 10
    raise OtaroError(f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:g}; "
                     "use more calibration samples or a larger --damp")


def gptq_solve(W: torch.Tensor, H: torch.Tensor, quantizer: ColumnQuantizer, *, block_size: int = 128,
               damp: float = 0.01, act_order: bool = False) -> dict:
    """Quantize ``W`` [out, in] against the Hessian ``H`` [in, in] (= 2/n Σ x xᵀ) column by column.

    The codes end up in ``quantizer`` (``quantizer.build(linear)`` makes the layer); neither
    ``W`` nor ``H`` is modified. Returns stats: ``loss`` = Σ (w − q)²/d² (the reference
    implementation's per-column objective, d the diagonal of the Cholesky factor), ``damp``
    (the damping fraction used after any retry), ``dead`` (columns no sample activated).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"gptq_solve: W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    if block_size < 1:
        raise ValueError(f"block size must be at least 1 (got {block_size})")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    n_cols = W.shape[1]
    G = quantizer.group_size

    # A column no calibration input ever activated has no curvature: its value cannot change
    # the output on the data, so it is quantized as zero and H gets a unit diagonal there.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = act_order  # with act-order, groups must be fixed from the unpermuted W
    quantizer.prepare(W, static)
    if act_order:
        # Columns with the largest curvature first, while most columns can still absorb error.
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(n_cols, device=W.device)
    order = perm.tolist()

    U, used_damp = _inverse_cholesky(H, damp)
    Hinv = U.to(torch.float32)
    del H, U

    # Accumulated on the device: a float() per column would stall a GPU on every column.
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % G == 0:
                quantizer.start_group(col // G, _current_columns(W, W1, Err1, Hinv, i1, i2, i, min(col + G, n_cols)))
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantizer.quantize_column(order[col], w.clone())  # a copy: W1 is updated in place below
            err = (w - q) / d
            loss += (err * err).sum()
            # Lazy batch update: inside the block now, the rest of W once per block (below).
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return {"loss": float(loss), "damp": used_damp, "dead": int(dead.sum())}


def _current_columns(W, W1, Err1, Hinv, i1: int, i2: int, i: int, end: int) -> torch.Tensor:
    """Columns ``i1+i .. end`` as they are at this point of the sweep.

    Inside the block they live in ``W1``; past the block (a group wider than the block, or not
    aligned with it) ``W`` still lacks this block's pending lazy update, which is applied here for
    the columns already done, so the quantizer sees the truly current weights."""
    inside = W1[:, i : min(end, i2) - i1]
    if end <= i2:
        return inside
    beyond = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=1)


def run_gptq(model, fmt, config, calibration, progress=None):
    """The ``gptq`` method: sequential block-by-block GPTQ on the calibration windows."""
    from otaro.formats import torch_ref
    from otaro.methods.calib import sequential_quantize, streams_for

    factory = quantizer_factory(fmt)  # fail before any forward pass
    if calibration is None:
        raise OtaroError("gptq needs calibration data (--calib)")

    def quantize_linear(name: str, linear: torch.nn.Linear, H: torch.Tensor):
        W = linear.weight.detach().to(torch.float32)
        torch_ref.check_finite(W, name)
        quantizer = factory(fmt, config)
        # A quantizer may ask for several error-feedback streams stacked along the rows (SEFP
        # keeps one per target bit-width); GPTQ's update is row-wise, so they stay independent.
        expand = getattr(quantizer, "expand", None)
        stats = gptq_solve(expand(W) if expand else W, H, quantizer, block_size=config.block_size,
                           damp=config.damp, act_order=config.act_order)
        return quantizer.build(linear), stats

    sequential_quantize(model, fmt, calibration, streams_for(fmt, config), quantize_linear, progress=progress)
    return model


register_method(
    Method(
        "gptq",
        "GPTQ: error-compensating column-by-column rounding against calibration Hessians "
        "(SEFP: λ-weighted over the target bit-widths)",
        families=("int", "sefp"),
        needs_calibration=True,
        run=run_gptq,
        target_bits=True,
    )
)
