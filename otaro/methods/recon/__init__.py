"""Block reconstruction (seed 001: SB/LA/MB-PTQ with SignRound; seed 004: LSI reuses it).

Layers as the rest of ``otaro.methods``: learnable fake quantizers per format family
(``quantizers``) → the window driver with fp targets and quantized-prefix inputs (``driver``,
on ``otaro.methods.calib``) → the methods (``signround``: ``sb``, ``la``, ``mb``;
``otaro.methods.lsi``: ``lsi``). Option defaults and checks: ``settings``.
"""

from otaro.methods.recon import signround  # noqa: F401  (registers sb, la, mb)
