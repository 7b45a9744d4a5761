"""Run onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``) on a folder.

The builder emits the fused decoder onnxruntime-genai ships for llama-family models
(GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization, ~340 nodes for
SmolLM2 against ~3,200 in the optimum trace), which is what makes its decode fast on CPU
(DESIGN.md §7.23). We use its float (``-p fp32``) graph and quantize it ourselves.

onnxruntime-genai 0.18's builder is written against transformers 5: it imports two Qwen3.5
classes 4.57 lacks (never used for a llama) and reads ``rope_parameters`` (4.57 has rope_theta
and ``rope_scaling=None``). :func:`_patch_transformers` supplies exactly those; everything else
is the builder's own code. It runs in a child process (``python -m otaro.export.genai_builder
JOBS``), so the patches never touch the caller's transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

from otaro.errors import OtaroError

TIMEOUT_S = 3600


def available() -> str | None:
    """None if the builder can run here, else what to install."""
    missing = [m for m in ("onnxruntime_genai", "onnx_ir") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"the fused decoder graph needs onnxruntime-genai's model builder ({', '.join(missing)} not "
                f"installed: pip install 'onnxruntime-genai>=0.18' 'onnx-ir==1.1.*'), or export with --graph traced")
    return None


def run_builder(jobs: list[list[str]], timeout: float = TIMEOUT_S) -> None:
    """Run the builder once per argument list (``-i SRC -o OUT -p ... -e ... -c CACHE ...``)."""
    need = available()
    if need:
        raise OtaroError(need)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "otaro.export.genai_builder", json.dumps(jobs)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise OtaroError(f"onnxruntime-genai's model builder did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-12:]
        raise OtaroError("onnxruntime-genai's model builder failed:\n  " + "\n  ".join(tail)
                         + "\n(export with --graph traced to use the optimum trace instead)")


def build_float(src: Path, out: Path, cache: Path) -> Path:
    """The builder's fp32 CPU graph of the Hugging Face folder ``src``; returns out/model.onnx."""
    run_builder([["-i", str(src), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache),
                  "--extra_options", "hf_token=false"]])
    path = out / "model.onnx"
    if not path.is_file():
        raise OtaroError(f"onnxruntime-genai's model builder wrote no model.onnx into {out}")
    return path


def _patch_transformers() -> None:
    import transformers

    for n in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, n):
            setattr(transformers, n, type(n, (), {}))
    orig = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *a, **k):
        got = orig(cls, *a, **k)
        cfg = got[0] if isinstance(got, tuple) else got  # (config, unused kwargs) when asked
        if getattr(cfg, "rope_scaling", {}) is None:
            cfg.rope_scaling = {"rope_type": "default"}  # what None means to 4.57 and to the builder
        if not hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
        return got

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)


def main(argv: list[str]) -> int:
    _patch_transformers()
    for job in json.loads(argv[0]):
        sys.argv = ["builder", *job]
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
