"""Validation of an exported model against the torch model at the same precision.

For each bit-width (single SEFP model) and each variant: prompt logits from onnxruntime vs
torch, and a short greedy continuation that must be token-for-token equal.

The strict check runs onnxruntime in its *exact* mode (``accuracy_level`` 1: fp32 activations
in every MatMulNBits, fused or written), because that is the math the file encodes. The level
the artifact ships with (4 = int8 activations, fast) is measured too and recorded, not judged:
its ~0.5% activation rounding may legitimately flip a near-tie greedy token.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from otaro.export.rewrite import set_default_bits
from otaro.runtime.decoder import Decoder

EXACT_LEVEL = 1
# fp32 logits of torch and onnxruntime differ only by summation order (and by ORT's blocked
# dequantize-then-GEMM vs torch's dense GEMM): ~1e-6 relative per layer. 1e-3 of the logit
# range leaves orders of magnitude of headroom over that, while one step of quantization on
# the wrong bit-width moves logits by >= 1% (tests check that a wrong bit-width fails).
REL_TOL = 1e-3


@dataclass(frozen=True)
class Check:
    model: str  # "main" or a variant name
    bits: int
    max_abs_diff: float
    logit_range: float
    tolerance: float
    greedy_equal: bool
    torch_tokens: tuple[int, ...]
    onnx_tokens: tuple[int, ...]
    shipped_level: int
    shipped_max_abs_diff: float
    shipped_greedy_equal: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.greedy_equal

    def record(self) -> dict:
        d = asdict(self)
        d["torch_tokens"], d["onnx_tokens"] = list(self.torch_tokens), list(self.onnx_tokens)
        d["passed"] = self.passed
        return d


def session_options(accuracy_level: int, threads: int | None = None) -> ort.SessionOptions:
    """The runtime's CPU session options at ``accuracy_level`` (one place sets them)."""
    from otaro.runtime.backends import select_backend
    from otaro.runtime.backends import session_options as backend_options

    return backend_options(select_backend("cpu", ort.get_available_providers(), accuracy_level), threads)


@contextlib.contextmanager
def graph_variant(path: Path, bits: int | None = None, accuracy_level: int | None = None):
    """A temporary copy of the graph (not the weights) beside ``path`` with the constant bits
    and/or every MatMulNBits' accuracy_level edited; yields its path."""
    proto = onnx.load(str(path), load_external_data=False)
    if bits is not None:
        set_default_bits(proto, bits)
    if accuracy_level is not None:
        for n in proto.graph.node:
            if n.op_type == "MatMulNBits":
                for a in n.attribute:
                    if a.name == "accuracy_level":
                        a.i = accuracy_level
    fd, tmp = tempfile.mkstemp(prefix=".validate-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def torch_reference(model, prompt: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """Prompt logits and greedy tokens of the torch model (no KV cache: the plain definition)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
        seq = ids
        for _ in range(new_tokens):
            nxt = model(seq).logits[0, -1].argmax().item()
            out.append(int(nxt))
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return logits, out


def _run(path: Path, level: int, bits: int | None, prompt: list[int], n: int, threads: int | None):
    with graph_variant(path, bits=bits, accuracy_level=level) as g:
        dec = Decoder(ort.InferenceSession(str(g), session_options(level, threads), providers=["CPUExecutionProvider"]))
        return dec.prompt_logits(prompt), dec.greedy(prompt, n)


def check(name: str, path: Path, model, bits: int, prompt: list[int], new_tokens: int, shipped_level: int,
          sefp_bits: bool, threads: int | None = None) -> Check:
    """Compare ``path`` (run at ``bits`` if ``sefp_bits``) with ``model`` already set to ``bits``."""
    ref_logits, ref_tokens = torch_reference(model, prompt, new_tokens)
    b = bits if sefp_bits else None
    logits, tokens = _run(path, EXACT_LEVEL, b, prompt, new_tokens, threads)
    s_logits, s_tokens = (logits, tokens) if shipped_level == EXACT_LEVEL else \
        _run(path, shipped_level, b, prompt, new_tokens, threads)
    scale = float(np.abs(ref_logits).max())
    return Check(
        model=name, bits=bits,
        max_abs_diff=float(np.abs(logits - ref_logits).max()), logit_range=scale,
        tolerance=REL_TOL * max(scale, 1.0),
        greedy_equal=tokens == ref_tokens, torch_tokens=tuple(ref_tokens), onnx_tokens=tuple(tokens),
        shipped_level=shipped_level, shipped_max_abs_diff=float(np.abs(s_logits - ref_logits).max()),
        shipped_greedy_equal=s_tokens == ref_tokens,
    )


def prompt_ids(tokenizer, vocab_size: int, length: int = 16) -> list[int]:
    """A fixed English prompt (or, without a tokenizer, fixed ids) for every validation."""
    from otaro.arch.tiny import SAMPLE_TEXT

    if tokenizer is not None:
        ids = tokenizer(SAMPLE_TEXT)["input_ids"][:length]
        if len(ids) >= 4:
            return [int(i) for i in ids]
    rng = np.random.default_rng(0)
    return [int(i) for i in rng.integers(0, vocab_size, length)]
