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


def test_runtime_loads_switches_and_generates_without_torch(tmp_path):
    from otaro import checkpoint
    from otaro.arch.tiny import tiny_model, tiny_tokenizer
    from otaro.export.artifact import ExportConfig, export
    from otaro.modules import convert

    checkpoint.save(convert(tiny_model("qwen2", init_std=0.15), "sefp-g16-nearest"), tmp_path / "ck",
                    tokenizer=tiny_tokenizer())
    export(ExportConfig(tmp_path / "ck", tmp_path / "art", accuracy_level=1, validate=False))
    code = textwrap.dedent(
        f"""
        import builtins, sys
        real_import = builtins.__import__
        def guarded(name, *a, **k):
            if name == "torch" or name.startswith("torch.") or name.split(".")[0] == "transformers":
                raise ImportError("torch is not installed on this device")
            return real_import(name, *a, **k)
        builtins.__import__ = guarded
        from otaro.runtime import Runtime
        import otaro.runtime.run_cli
        rt = Runtime.load({str(tmp_path / "art")!r}, accuracy_level=1)
        g8 = rt.generate("The quick brown fox", max_new_tokens=5)
        with rt.precision(3) as report:
            g3 = rt.generate("The quick brown fox", max_new_tokens=5)
        assert not report.cached and g3.precision == "3" and g8.precision == "8"
        assert "".join(rt.stream("The quick brown fox", max_new_tokens=5)) == g8.text
        assert rt.generate(["The quick brown fox", "A"], max_new_tokens=5)[0].token_ids == g8.token_ids
        assert len(g8.token_ids) == 5 and g3.token_ids != g8.token_ids
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        # layering: the runtime sits below the exporter and never imports it
        assert not [m for m in sys.modules if m.startswith("otaro.export")], "runtime imported the exporter"
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
