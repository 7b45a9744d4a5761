"""otaro.kernels — Triton kernels (bit-plane SEFP GEMV/GEMM), each beside a torch reference.

Not built yet (its own issue). The bit-plane layout they read is produced by
:func:`otaro.formats.pack.pack_bitplanes`.
"""
