"""otaro: once-tuned, any-precision LLMs for on-device deployment.

This top-level module stays import-light on purpose: ``otaro.runtime`` and ``otaro.formats``
must import on a machine without torch, and importing a sub-package imports this file first.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
