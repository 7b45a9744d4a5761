"""otaro.profiling — ``otaro profile``: latency and memory per bit-width, per device.

* :mod:`~otaro.profiling.bandwidth` — this machine's memory bandwidth and matmul speed;
* :mod:`~otaro.profiling.roofline` — bytes and FLOPs per token of an artifact at each b, and
  what a device profile (:mod:`otaro.devices`) allows;
* :mod:`~otaro.profiling.measure` — the measurement itself (:func:`run_profile`) and
  prediction-only reports (:func:`predict_only`);
* :mod:`~otaro.profiling.competitors` — per-bit files and llama-bench, the competitors' way;
* :mod:`~otaro.profiling.report` — schema, tables, plot.

Torch-free like the runtime it measures (numpy, onnx, onnxruntime; matplotlib for the PNG).
"""
