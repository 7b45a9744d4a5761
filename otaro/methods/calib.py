"""Calibration data and the sequential block-by-block driver of calibrated methods (GPTQ).

* ``calibration_windows`` reads the same data specs as ``otaro finetune`` (``.txt``, ``.jsonl``,
  folders, saved datasets, ``corpus:NAME``), tokenizes them into one stream and draws
  ``n_samples`` non-overlapping windows of ``seq_len`` tokens with a seeded generator, so the
  same data and seed give the same calibration set. A model that expects a BOS at every
  sequence start (``otaro.tokens.leading_bos``) gets it first in every window, as in training
  and evaluation: its layer inputs are calibrated on the sequences it actually sees.
* ``sequential_quantize`` follows the original GPTQ driver: capture the inputs of decoder layer
  0, then per block accumulate each linear's Hessian from the block's current inputs, quantize
  the block's linears, and run the *quantized* block to make the next block's inputs (later
  blocks see the error of the already-quantized prefix and compensate for it).
* **Streams.** A precision-switching format (SEFP) is calibrated for several bit-widths at
  once: one hidden-state stream per target bit-width ``b`` with weight ``λ_b``, each propagated
  through the quantized blocks at precision ``b``; a linear's Hessian is
  ``Σ λ_b H_b / Σ λ_b`` with ``H_b`` from stream ``b``'s inputs. Fixed-precision formats use one
  stream ``[(1.0, None)]``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from otaro.errors import OtaroError

Stream = tuple[float, "int | None"]  # (weight λ_b, bit-width b; None = the layer as built)


# --------------------------------------------------------------------------------------------
# Calibration windows
# --------------------------------------------------------------------------------------------


def calibration_windows(tokenizer, specs: Sequence[str], n_samples: int, seq_len: int, seed: int = 0,
                        max_positions: int | None = None) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` token ids, int64 ``[n_samples, seq_len]`` (the BOS
    first, then ``seq_len - 1`` text tokens, when the model expects one)."""
    from otaro.tokens import leading_bos
    from otaro.training.data import load_examples, token_stream

    if max_positions is not None and seq_len > max_positions:
        raise OtaroError(f"calibration length {seq_len} is larger than the model allows ({max_positions}); "
                         "lower --calib-len")
    if tokenizer is None:
        raise OtaroError("the model has no tokenizer to read the calibration text with")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise OtaroError("the tokenizer has no end-of-sequence token to separate calibration examples")
    ids, _ = token_stream(tokenizer, load_examples(list(specs)), eos_id)
    bos = leading_bos(tokenizer)
    body = seq_len - (bos is not None)  # text tokens per window
    need = n_samples * body
    if len(ids) < need:
        raise OtaroError(f"calibration text has {len(ids)} tokens; need n_samples × seq_len = {n_samples} × "
                         f"{body} = {need}: lower --calib-samples/--calib-len or add text")
    stream = torch.frombuffer(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    # Cut the stream into consecutive windows from a seeded offset, then pick n_samples of them:
    # no window overlaps another, and every part of the text can be drawn.
    n_windows = len(ids) // body
    offset = int(torch.randint(0, len(ids) - n_windows * body + 1, (1,), generator=gen))
    windows = stream[offset : offset + n_windows * body].view(n_windows, body)
    pick = torch.randperm(n_windows, generator=gen)[:n_samples]
    if bos is None:
        return windows[pick].clone()
    return torch.cat([torch.full((len(pick), 1), bos, dtype=torch.long), windows[pick]], dim=1)


def check_calibration_specs(specs: Sequence[str]) -> None:
    """Fail on a missing file or an unknown file type before any model is loaded."""
    from otaro.training.data import source_kind

    for spec in specs:
        source_kind(spec)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


def streams_for(fmt, config) -> list[Stream]:
    """Precision-switching formats (SEFP) get one stream per target bit-width of the config
    (``config.bits`` = ((b, λ_b), ...)); a fixed-precision format has exactly one stream."""
    if fmt.family == "sefp":
        return [(float(weight), int(b)) for b, weight in config.bits]
    return [(1.0, None)]


# --------------------------------------------------------------------------------------------
# Layer inputs
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook so the model forward stops at decoder layer 0."""


def _hidden_and_rest(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def capture_layer_inputs(model, layers: nn.ModuleList, windows: torch.Tensor):
    """(hidden states entering layer 0 ``[n, L, d]``, per-layer (args, kwargs) besides them).

    The extra arguments (attention mask, position ids and embeddings, cache position, ...) are
    whatever this transformers version's model passes each decoder layer; they depend on the
    window length only (no padding, no cache), so one full forward of the first window records
    them for every layer, and the inputs of every window are caught at layer 0.
    """
    device = windows.device
    extra: list[tuple[tuple, dict] | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []

    def record(i):
        def hook(module, args, kwargs):
            h, rest_args, rest_kwargs = _hidden_and_rest(args, kwargs)
            if extra[i] is None:
                extra[i] = (rest_args, rest_kwargs)
            if i == 0:
                hidden.append(h.detach())
                if extra[-1] is not None:  # the first window already went all the way through
                    raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for k in range(windows.shape[0]):
            try:
                model(input_ids=windows[k : k + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(hidden), extra


def run_layer(layer: nn.Module, hidden: torch.Tensor, extra: tuple[tuple, dict]) -> torch.Tensor:
    """``layer`` over every window (one at a time, as captured); decoder layers return a tensor or
    a tuple whose first item is the hidden state, depending on the architecture and version."""
    args, kwargs = extra
    out = torch.empty_like(hidden)
    for k in range(hidden.shape[0]):
        y = layer(hidden[k : k + 1], *args, **kwargs)
        out[k : k + 1] = y[0] if isinstance(y, (tuple, list)) else y
    return out


# --------------------------------------------------------------------------------------------
# Hessians
# --------------------------------------------------------------------------------------------


def block_hessians(layer: nn.Module, linear_names: Sequence[str], inputs: Sequence[torch.Tensor],
                   weights: Sequence[float], extra: tuple[tuple, dict]) -> dict[str, torch.Tensor]:
    """H of every linear of ``layer``: Σ_b λ_b H_b / Σ_b λ_b, with H_b = 2/n Σ x xᵀ over the n
    tokens of stream b's inputs (``inputs[b]`` ``[n_windows, L, d]``), accumulated in float32.

    Every stream has the same number of tokens, so the weighted sum is accumulated directly into
    one matrix per linear (no per-stream copies of in_features² floats).
    """
    if len(inputs) != len(weights) or not inputs:
        raise ValueError("one weight per stream is needed")
    total = float(sum(weights))
    linears = {name: layer.get_submodule(name) for name in linear_names}
    H = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=inputs[0].device)
         for name, m in linears.items()}
    scale = [0.0]

    def accumulate(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, module.in_features).to(torch.float32)
            H[name].addmm_(x.T, x, alpha=scale[0])
        return hook

    handles = [m.register_forward_hook(accumulate(name)) for name, m in linears.items()]
    try:
        for x, weight in zip(inputs, weights):
            n_tokens = x.shape[0] * x.shape[1]
            scale[0] = 2.0 * weight / (total * n_tokens)
            run_layer(layer, x, extra)
    finally:
        for h in handles:
            h.remove()
    return H


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

# quantize_linear(full name, fp linear, H) -> (quantized module, stats)
LinearQuantizer = Callable[[str, nn.Linear, torch.Tensor], tuple[nn.Module, dict]]


@torch.no_grad()
def sequential_quantize(model, fmt, windows: torch.Tensor, streams: Sequence[Stream],
                        quantize_linear: LinearQuantizer, progress=None) -> dict[str, dict]:
    """Quantize the adapter's linears block by block, in place; returns the stats per layer.

    The result looks like ``convert``'s: the same layer classes in the same places, embeddings
    and head untouched, ``model.otaro`` attached and SEFP layers at their top precision, so
    ``checkpoint.save`` writes it unchanged. ``progress(name)`` is called after each linear.
    """
    from otaro.arch import get_adapter, get_layers
    from otaro.modules import QuantInfo, attach, set_precision

    adapter = get_adapter(model)
    if getattr(model, "otaro", None) is not None:
        raise OtaroError("model is already quantized")
    if not streams:
        raise ValueError("at least one calibration stream is needed")
    weights = [float(w) for w, _ in streams]
    device = next(model.parameters()).device
    layers = get_layers(model, adapter)
    was_training = model.training
    model.eval()
    hidden0, extra = capture_layer_inputs(model, layers, windows.to(device))
    inputs = [hidden0] + [hidden0.clone() for _ in streams[1:]]
    names: list[str] = []
    stats: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}"
        for rel in adapter.linear_names:
            if not isinstance(layer.get_submodule(rel), nn.Linear):
                raise OtaroError(f"{prefix}.{rel} is {type(layer.get_submodule(rel)).__name__}, expected nn.Linear")
        H = block_hessians(layer, adapter.linear_names, inputs, weights, extra[i])
        for rel in adapter.linear_names:
            name = f"{prefix}.{rel}"
            module, stats[name] = quantize_linear(name, layer.get_submodule(rel), H.pop(rel))
            parent, _, child = rel.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, module)
            names.append(name)
            if progress:
                progress(name)
        attach(model, QuantInfo(fmt, adapter.name, tuple(names)))
        if i + 1 < len(layers):  # the last block's outputs feed nothing we quantize
            for s, (_, bits) in enumerate(streams):
                if bits is not None:
                    set_precision(model, {f"{prefix}.*": bits})
                inputs[s] = run_layer(layer, inputs[s], extra[i])
    if fmt.family == "sefp":  # as convert leaves a packed SEFP model
        set_precision(model, fmt.top_bits)
    model.train(was_training)
    return stats
