"""Hugging Face quantized folders: integer checkpoints in the layouts their ecosystems read.

- :mod:`otaro.hf.layouts` — the layout registry (``LAYOUTS``, ``METHOD_LAYOUTS``) and ``LayerCodes``;
- :mod:`otaro.hf.gptq_layout` — GPTQ v1 (AutoGPTQ, transformers/optimum, onnxruntime-genai);
- :mod:`otaro.hf.awq_layout` — AWQ GEMM, 4-bit (AutoAWQ, transformers, onnxruntime-genai);
- :mod:`otaro.hf.codes` — ``IntLinear`` <-> ``LayerCodes``;
- :mod:`otaro.hf.writer` — model -> folder (``otaro quantize --save-format hf``);
- :mod:`otaro.hf.reader` — folder -> model (``otaro.checkpoint`` dispatches to it).
"""

from otaro.hf import awq_layout, gptq_layout  # noqa: F401  (register the layouts)
from otaro.hf.layouts import LAYOUTS, METHOD_LAYOUTS, get_layout, layout_for_method  # noqa: F401
from otaro.hf.reader import is_hf_quantized, load, read_manifest  # noqa: F401
from otaro.hf.writer import check_model, save  # noqa: F401
