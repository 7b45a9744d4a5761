"""GPTQ's column quantizer for integer formats (``int{b}-g{G}-{sym|asym}``).

Group parameters follow ``torch_ref.int_rtn_params`` exactly (min/max with zero inside the
range for asym, max |w| for sym, fp16-representable scales) and a column is coded the way
``torch_ref.int_encode_with`` codes it, so with no error feedback (H = I) the codes are RTN's,
bit for bit, and the layer is the same ``IntLinear`` layout RTN writes.
"""

from __future__ import annotations

import torch

from otaro.formats import IntFormat
from otaro.formats import torch_ref as Q
from otaro.methods.gptq import register_quantizer
from otaro.modules import IntLinear


class IntColumnQuantizer:
    def __init__(self, fmt: IntFormat, config=None):
        self.fmt = fmt
        self.group_size = fmt.group_size

    def prepare(self, W: torch.Tensor, static_groups: bool) -> None:
        out, n_in = W.shape
        G = self.group_size
        self.in_features = n_in
        in_p = -(-n_in // G) * G
        self.codes = torch.zeros(out, in_p, dtype=torch.int16, device=W.device)
        if static_groups:
            self.scale, self.zero = Q.int_rtn_params(Q.pad_groups(W.to(torch.float32), G), self.fmt)
        else:  # filled group by group by start_group
            self.scale = torch.ones(out, in_p // G, dtype=torch.float32, device=W.device)
            self.zero = torch.zeros(out, in_p // G, dtype=torch.int16, device=W.device)

    def start_group(self, g: int, Wg: torch.Tensor) -> None:
        # A ragged last group is zero-padded like RTN's; zeros never move the parameters
        # (sym: max |w|; asym: the range is already widened to include 0).
        padded = Q.pad_groups(Wg.to(torch.float32), self.group_size)
        scale, zero = Q.int_rtn_params(padded, self.fmt)
        self.scale[:, g], self.zero[:, g] = scale[:, 0], zero[:, 0]

    def quantize_column(self, j: int, w: torch.Tensor) -> torch.Tensor:
        g = j // self.group_size
        scale, zero = self.scale[:, g], self.zero[:, g]
        q = torch.clamp(torch.round(w / scale) + zero, self.fmt.qmin, self.fmt.qmax)
        self.codes[:, j] = q.to(torch.int16)
        return (q - zero).to(torch.float32) * scale  # what int_dequantize will compute

    def build(self, linear: torch.nn.Linear) -> torch.nn.Module:
        # Padding columns hold the code of a zero weight (the group's zero point), as RTN's do.
        G, n_in = self.group_size, self.in_features
        if self.codes.shape[1] > n_in:
            self.codes[:, n_in:] = self.zero[:, n_in // G].unsqueeze(1)
        return IntLinear.from_codes(linear, self.fmt, self.codes, self.scale, self.zero)


register_quantizer("int", IntColumnQuantizer)
