"""otaro.runtime — the torch-free on-device runtime (numpy, onnx, onnxruntime, tokenizers, jinja2).

:class:`Runtime` loads an exported artifact (:mod:`otaro.runtime.artifact`) once and runs it at
any precision its SEFP weights carry, switching per call or per request
(:mod:`otaro.runtime.switch`) on the backend :func:`select_backend` picks. A test imports and
runs all of it in a subprocess where importing torch fails; keep it that way.

The names below load on first use, so ``import otaro.runtime.artifact`` (the exporter) and
``otaro --help`` (which registers ``otaro run``) do not pay for onnx and onnxruntime.
"""

import importlib

_EXPORTS = {
    "Runtime": "api", "Generation": "api", "GenerationConfig": "api", "Stream": "api",
    "select_backend": "backends", "BackendChoice": "backends", "BACKENDS": "backends",
    "Precision": "switch", "SwitchReport": "switch", "parse_precision": "switch",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'otaro.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"otaro.runtime.{_EXPORTS[name]}"), name)
