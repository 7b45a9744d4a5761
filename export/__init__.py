"""otaro.export — ONNX export of SEFP checkpoints (issue: `otaro export --format onnx`).

Not built yet: the exporter arrives with its own issue. It reads checkpoints written by
:mod:`otaro.checkpoint` and the packers in :mod:`otaro.formats.pack`.
"""
