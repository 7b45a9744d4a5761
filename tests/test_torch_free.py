"""The runtime side must import and work on a device without torch."""

import subprocess
import sys
import textwrap


def test_formats_and_runtime_import_and_decode_without_torch():
    code = textwrap.dedent(
        """
        import builtins, sys
        real_import = builtins.__import__
        def guarded(name, *a, **k):
            if name == "torch" or name.startswith("torch.") or name == "transformers":
                raise ImportError("torch is not installed on this device")
            return real_import(name, *a, **k)
        builtins.__import__ = guarded
        import numpy as np
        import otaro.runtime, otaro.formats
        from otaro.formats import get_format, sefp, intq, pack
        w = np.linspace(-1, 1, 64 * 3, dtype=np.float32).reshape(3, 64)
        t = sefp.encode(w, get_format("sefp-g64-trunc"))
        assert np.abs(sefp.decode(t, 8) - w).max() < 2 ** -6
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
