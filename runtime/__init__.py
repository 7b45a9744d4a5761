"""otaro.runtime — the torch-free on-device runtime (numpy, onnx, onnxruntime, tokenizers only).

Not built yet (its own issue). Whatever lands here must import without torch; a test checks
that in a subprocess where importing torch fails.
"""
