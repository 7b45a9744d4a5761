"""Start fine-tuning from a quantized checkpoint's codes (``otaro finetune --init CKPT``).

Fine-tuning trains float master weights through the fake quantizer, which re-encodes them
every step. Starting from a post-training checkpoint (multi-bit GPTQ, say) means setting each
master weight to the checkpoint's 8-bit weight ``M8 · Δ8`` *and* freezing its shared scales
(``SEFPLinear.fix_shared_``). Re-deriving the scales from each group's max |w| would not give
the start back: a scale search or GPTQ's error feedback leaves many groups without a
magnitude-127 code, so their scale would shrink and their codes move. With the scales frozen,
every stored code comes back, which is measured and reported, not assumed. The scales stay fixed while the weights train (the
paper's scales follow max |w|; here the start's search is kept). The teacher for distillation
stays the original float model, never the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from otaro.errors import OtaroError


@dataclass(frozen=True)
class InitReport:
    layers: int
    codes: int
    reproduced: int  # stored codes that the master weight re-encodes to exactly

    @property
    def fraction(self) -> float:
        return self.reproduced / self.codes if self.codes else 1.0

    def line(self, path: str) -> str:
        return (f"init: {self.layers} layers from {path}; {100 * self.fraction:.2f}% of its stored codes "
                "re-encode exactly, on its frozen shared scales")


def check_init_path(path: str, fmt_name: str) -> None:
    """Cheap checks for the config (before any model is loaded): a checkpoint of this format."""
    from otaro import checkpoint

    if not checkpoint.is_checkpoint(path):
        raise OtaroError(f"--init {path}: not an otaro checkpoint folder (it needs otaro.json)")
    fmt = checkpoint.format_of(checkpoint.read_manifest(path))
    if fmt.name != fmt_name:
        raise OtaroError(f"--init {path} is stored as {fmt.name}, but this run trains {fmt_name}: "
                         f"pass --format {fmt.name} or quantize the start in {fmt_name}")


def apply_init(model: torch.nn.Module, path: str | Path) -> InitReport:
    """Set every master weight of ``model`` (already converted, unpacked) to the checkpoint's
    8-bit weight. Every trained layer must be in the checkpoint with the same shape; layers the
    checkpoint has beyond them (a quantized head: the head trains in float) are left out."""
    from otaro import checkpoint
    from otaro.modules import quant_layers

    start = checkpoint.load(path)
    theirs = quant_layers(start)
    ours = quant_layers(model)
    missing = [n for n in ours if n not in theirs]
    if missing:
        raise OtaroError(f"--init {path} lacks {len(missing)} of the model's layers (e.g. {missing[0]!r}): "
                         "it was quantized from another model")
    codes = reproduced = 0
    with torch.no_grad():
        for name, layer in ours.items():
            src = theirs[name]
            if (src.out_features, src.in_features) != (layer.out_features, layer.in_features):
                raise OtaroError(f"--init {path}: layer {name!r} is {src.out_features}x{src.in_features} there, "
                                 f"{layer.out_features}x{layer.in_features} in the model")
            w8 = src.quantized_weight(layer.fmt.top_bits).to(layer.weight.dtype)
            layer.weight.copy_(w8)
            layer.fix_shared_(src.shared)
            if src.bias is not None and layer.bias is not None:
                layer.bias.copy_(src.bias)
            m8, _ = layer.codes()
            codes += m8.numel()
            reproduced += int((m8 == src.mantissa).sum())
            layer._cache = None
    return InitReport(len(ours), codes, reproduced)
