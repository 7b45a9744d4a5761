"""Bad paths and lost work: every case exits non-zero with one clear line (``Error: ...``), no
traceback, and leaves no partial output behind.

Write errors on the output, outputs over inputs, tokenizer files, malformed manifests,
non-UTF-8 data, SIGTERM/SIGKILL during a write, and small CLI details. Tiny models, seconds each.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from otaro import checkpoint
from otaro.arch.tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer
from otaro.cli import cli
from otaro.errors import CheckpointError, OtaroError, OutputError
from otaro.io import atomic_dir, atomic_file, check_writable_output, remove_stale
from otaro.modules import convert

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _fails(res, *needles, code=None):
    """Non-zero, exactly one ``Error:`` line (or the interrupt line), no traceback."""
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output
    return errors[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name.endswith(".tmp")
                  or ".old-" in p.name or p.name.startswith(".otaro-probe"))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tiny SEFP checkpoint with a tokenizer."""
    path = tmp_path_factory.mktemp("bp-ck") / "ck"
    checkpoint.save(convert(tiny_model("llama", init_std=0.15), "sefp-g16-trunc"), path, tokenizer=tiny_tokenizer())
    return path


@pytest.fixture(scope="module")
def art(tmp_path_factory, ck):
    from otaro.export.artifact import ExportConfig, export

    path = tmp_path_factory.mktemp("bp-art") / "art"
    export(ExportConfig(ck, path, accuracy_level=1, validate=False))
    return path


@pytest.fixture
def hf(tmp_path, hf_model):
    """A private copy of the tiny Hugging Face folder (tests may tamper with it)."""
    return Path(shutil.copytree(hf_model, tmp_path / "hf"))


def _copy(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


# --------------------------------------------------------------------------------------------
# 1. Write errors on the output path
# --------------------------------------------------------------------------------------------


def _permissions_apply(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except PermissionError:
        return True
    (folder / ".probe").unlink()
    return False


def test_read_only_output_folder_is_refused_before_any_work(tmp_path, monkeypatch, text_file):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not _permissions_apply(ro):
            # Root ignores the mode bits: make the probe meet what a read-only folder answers.
            import otaro.io

            real = otaro.io.tempfile.mkstemp

            def read_only(*a, dir=None, **k):
                if dir is not None and Path(dir) == ro:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
                return real(*a, dir=dir, **k)

            monkeypatch.setattr(otaro.io.tempfile, "mkstemp", read_only)
        import otaro.evaluation.run
        import otaro.sources

        def no_work(*a, **k):
            raise AssertionError("the work started before the output was checked")

        monkeypatch.setattr(otaro.sources, "load_source", no_work)
        monkeypatch.setattr(otaro.evaluation.run, "run_eval", no_work)
        _fails(invoke("quantize", "tiny-llama", "-o", ro / "q"), "cannot write", "Permission denied")
        _fails(invoke("eval", "tiny-llama", "--text", text_file, "-o", ro / "ev"), "cannot write", "Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_file_where_a_folder_should_be(tmp_path, monkeypatch, text_file, ck):
    import otaro.evaluation.run
    import otaro.sources

    blocker = tmp_path / "afile"
    blocker.write_text("x")

    def no_work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(otaro.sources, "load_source", no_work)
    monkeypatch.setattr(otaro.evaluation.run, "run_eval", no_work)
    _fails(invoke("quantize", "tiny-llama", "-o", blocker / "q"), "cannot write", "is a file, not a folder")
    _fails(invoke("eval", "tiny-llama", "--text", text_file, "-o", blocker / "ev"), "is a file, not a folder")
    _fails(invoke("eval", "tiny-llama", "--text", text_file, "-o", blocker), "is a file")  # click: exit 2
    _fails(invoke("quantize", "tiny-llama", "-o", blocker), "is a file")  # click's own check: exit 2
    monkeypatch.undo()
    _fails(invoke("export", ck, "-o", blocker / "art"), "is a file, not a folder")
    _fails(invoke("finetune", "tiny-llama", "--data", text_file, "-o", blocker / "ft", "--steps", 1),
           "is a file, not a folder")
    assert blocker.read_text() == "x" and _leftovers(tmp_path) == []
    # The helper itself, and the atomic writers behind every output.
    with pytest.raises(OutputError, match="a file is in the way"):
        check_writable_output(blocker)
    with pytest.raises(OutputError, match="a file is in the way"):
        with atomic_dir(blocker, overwrite=True):
            pass
    with pytest.raises(OutputError, match="afile is a file, not a folder"):
        with atomic_file(blocker / "x.json", "w") as f:
            f.write("{}")


def _run_cli(*args, stdout, timeout=120):
    return subprocess.run([sys.executable, "-m", "otaro.cli", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("formats",), ("formats", "--json"), ("--help",)])
def test_stdout_to_dev_full_is_one_line(args):
    with open("/dev/full", "w") as full:
        r = _run_cli(*args, stdout=full)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == ["Error: cannot write to standard output: No space left on device"], r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_inspect_to_dev_full_is_one_line(art):
    with open("/dev/full", "w") as full:
        r = _run_cli("inspect", art, "--json", stdout=full)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: cannot write to standard output: No space left on device"], r.stderr


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_a_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    out = tmp_path / "q"
    _fails(invoke("quantize", "tiny-llama", "-o", out), f"cannot write {out}: No space left on device")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_full_disk_while_writing_eval_results(tmp_path, monkeypatch, text_file):
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _enospc)
    out = tmp_path / "ev"
    _fails(invoke("eval", "tiny-llama", "--text", text_file, "--bits", "8", "--seq-len", 32, "--max-windows", 1,
                  "--no-baseline", "--format", "sefp-g16-trunc", "-o", out), "cannot write", "No space left on device")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_full_disk_in_the_atomic_writers(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=f"cannot write {out}: No space left on device"):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("x")
            _enospc()
    with pytest.raises(OutputError, match="cannot write .*out.json: No space left on device"):
        with atomic_file(tmp_path / "out.json", "w") as f:
            f.write("x")
            _enospc()
    # a writer inside a folder names the folder the user asked for, not its temporary name
    with pytest.raises(OutputError) as e:
        with atomic_dir(out) as tmp:
            with atomic_file(tmp / "m.json", "w"):
                _enospc()
    assert str(e.value) == f"cannot write {out}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # an error reading an input is not a write error: it keeps its own exception
    with pytest.raises(FileNotFoundError):
        with atomic_dir(out):
            open(tmp_path / "missing-input")


# --------------------------------------------------------------------------------------------
# 2. An output that is, or holds, an input
# --------------------------------------------------------------------------------------------


def test_quantize_refuses_to_overwrite_its_own_input(tmp_path, hf, text_file):
    before = _digest(hf)
    _fails(invoke("quantize", hf, "-o", hf, "--overwrite"), "is the input", "choose another -o")
    _fails(invoke("quantize", hf, "-o", tmp_path, "--overwrite"), "holds the input")
    link = tmp_path / "link"
    link.symlink_to(hf)
    _fails(invoke("quantize", hf, "-o", link, "--overwrite"), "is the input")
    out = tmp_path / "q"
    out.mkdir()
    shutil.copy(text_file, out / "calib.txt")
    _fails(invoke("quantize", "tiny-llama", "--method", "gptq", "--calib", out / "calib.txt", "-o", out, "--overwrite"),
           "holds the input", "calib.txt")
    assert _digest(hf) == before and (out / "calib.txt").is_file()


def test_export_refuses_to_overwrite_its_own_checkpoint(tmp_path, ck):
    mine = _copy(ck, tmp_path / "ck")
    before = _digest(mine)
    _fails(invoke("export", mine, "-o", mine, "--overwrite"), "is the input")
    _fails(invoke("export", mine, "-o", tmp_path, "--overwrite"), "holds the input")
    _fails(invoke("export", ck, "-o", tmp_path, "--overwrite", "--variant", f"v={mine}"), "holds the input")
    assert _digest(mine) == before


def test_finetune_refuses_to_overwrite_its_model_or_data(tmp_path, hf, text_file):
    before = _digest(hf)
    _fails(invoke("finetune", hf, "--data", text_file, "-o", hf, "--overwrite"), "is the input")
    data = tmp_path / "out" / "train.txt"
    data.parent.mkdir()
    shutil.copy(text_file, data)
    _fails(invoke("finetune", "tiny-llama", "--data", data, "-o", data.parent, "--overwrite"), "holds the input")
    # the run folder OUT.run/ is replaced by --overwrite too
    run_data = tmp_path / "ft.run" / "train.txt"
    run_data.parent.mkdir()
    shutil.copy(text_file, run_data)
    _fails(invoke("finetune", "tiny-llama", "--data", run_data, "-o", tmp_path / "ft", "--overwrite"), "holds the input")
    assert _digest(hf) == before and data.is_file() and run_data.is_file()


# --------------------------------------------------------------------------------------------
# 3. Tokenizer files are artifact files
# --------------------------------------------------------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _drop_tokenizer_records(ckpt: Path) -> None:
    """Make ``ckpt`` look like a checkpoint written before tokenizer checksums."""
    m = json.loads((ckpt / "otaro.json").read_text())
    m.pop("tokenizer_files")
    (ckpt / "otaro.json").write_text(json.dumps(m))


def test_checkpoint_tokenizer_files_are_checksummed(tmp_path, ck):
    m = json.loads((ck / "otaro.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(m["tokenizer_files"])
    mine = _copy(ck, tmp_path / "ck")
    _edit_json(mine / "tokenizer_config.json", model_max_length=7)
    _fails(invoke("export", mine, "-o", tmp_path / "art"), "tokenizer_config.json is corrupt or truncated")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load_tokenizer(mine)
    # a tokenizer file the manifest does not list was not written with the model
    other = _copy(ck, tmp_path / "ck2")
    (other / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(CheckpointError, match="chat_template.jinja is not listed"):
        checkpoint.load_tokenizer(other)
    assert not (tmp_path / "art").exists()


def test_checkpoints_without_tokenizer_checksums_still_load(tmp_path, ck):
    old = _copy(ck, tmp_path / "old")
    _drop_tokenizer_records(old)
    tok = checkpoint.load_tokenizer(old)
    assert tok is not None and tok("hello")["input_ids"]


def test_tokenizer_file_outside_the_folder_is_refused(tmp_path, ck, hf, text_file):
    old = _copy(ck, tmp_path / "old")
    _drop_tokenizer_records(old)
    _edit_json(old / "tokenizer_config.json", tokenizer_file="/etc/passwd")
    _fails(invoke("export", old, "-o", tmp_path / "art"), "tokenizer_file '/etc/passwd' is not a file inside")
    _fails(invoke("eval", old, "--text", text_file, "-o", tmp_path / "ev"), "tokenizer_file")
    _edit_json(hf / "tokenizer_config.json", vocab_file="../../secret.json")
    _fails(invoke("quantize", hf, "-o", tmp_path / "q"), "vocab_file '../../secret.json' is not a file inside")
    assert not any((tmp_path / n).exists() for n in ("art", "ev", "q"))


def test_corrupt_tokenizer_json_is_one_checkpoint_error(tmp_path, ck, hf):
    (hf / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    _fails(invoke("quantize", hf, "-o", tmp_path / "q"), "tokenizer.json is corrupt")
    (hf / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    _fails(invoke("quantize", hf, "-o", tmp_path / "q"), "the tokenizer in", "cannot be read")
    old = _copy(ck, tmp_path / "old")
    _drop_tokenizer_records(old)
    (old / "tokenizer.json").write_text("[" * 100000)
    _fails(invoke("export", old, "-o", tmp_path / "art"), "tokenizer.json is corrupt", "nested too deeply")
    assert not (tmp_path / "q").exists() and not (tmp_path / "art").exists()


def _rehash(artifact: Path, name: str) -> None:
    from otaro.io import sha256_file

    m = json.loads((artifact / "otaro_artifact.json").read_text())
    m["files"][name] = {"sha256": sha256_file(artifact / name), "bytes": (artifact / name).stat().st_size}
    (artifact / "otaro_artifact.json").write_text(json.dumps(m))


def test_runtime_verifies_and_confines_tokenizer_files(tmp_path, art):
    from otaro.runtime import Runtime

    m = json.loads((art / "otaro_artifact.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(m["files"])  # checksummed like the model
    bad = _copy(art, tmp_path / "bad")
    data = (bad / "tokenizer.json").read_bytes()
    (bad / "tokenizer.json").write_bytes(b"{" + data[1:-1] + b"!")  # same size, no longer JSON
    with pytest.raises(OtaroError, match="tokenizer.json is corrupt or truncated"):
        Runtime.load(bad)
    with pytest.raises(OtaroError, match="tokenizer.json is corrupt"):
        Runtime.load(bad, verify=False)  # sizes only: the JSON check still catches it
    escape = _copy(art, tmp_path / "escape")
    _edit_json(escape / "tokenizer_config.json", tokenizer_file="/etc/passwd")
    _rehash(escape, "tokenizer_config.json")
    with pytest.raises(OtaroError, match="tokenizer_file '/etc/passwd' is not a file inside"):
        Runtime.load(escape)
    extra = _copy(art, tmp_path / "extra")
    (extra / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(OtaroError, match="chat_template.jinja is not listed"):
        Runtime.load(extra)
    r = invoke("run", escape, "--prompt", "hi")
    _fails(r, "not a file inside")


# --------------------------------------------------------------------------------------------
# 4. Malformed manifests
# --------------------------------------------------------------------------------------------


def _manifest(path: Path, name: str) -> dict:
    return json.loads((path / name).read_text())


@pytest.mark.parametrize("damage, needle", [
    (lambda m: m.pop("weights"), "'weights' is missing"),
    (lambda m: m["layers"].update({"model.layers.0.mlp.up_proj": 5}), "must be an object"),
    (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].pop("in_features"), "in_features' is missing"),
    (lambda m: m["format"].update(name=5), "'format.name' must be a string"),
    (lambda m: m.update(method="rtn"), "'method' must be an object"),
    (lambda m: m["weights"].update(bytes="many"), "'weights.bytes' must be a non-negative integer"),
    (lambda m: m.update(tied={"a": [[[["b"]]]]}), "'tied.a' must be a string"),
    (lambda m: m.update(high_precision=[1, 2]), "'high_precision[0]' must be a string"),
])
def test_inspect_malformed_checkpoint_manifest(tmp_path, ck, damage, needle):
    bad = _copy(ck, tmp_path / "bad")
    m = _manifest(bad, "otaro.json")
    damage(m)
    (bad / "otaro.json").write_text(json.dumps(m))
    _fails(invoke("inspect", bad), needle)
    with pytest.raises(CheckpointError):
        checkpoint.load(bad)


@pytest.mark.parametrize("raw, needle", [
    (b"[" * 100000, "nested too deeply"),
    (b'{"a": ' * 150 + b"1" + b"}" * 150, "nested more than 100 levels"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"otaro_checkpoint": ' + b"1" * 5000 + b"}", "not valid JSON"),
    (b"", "not valid JSON"),
])
@pytest.mark.parametrize("kind", ["checkpoint", "artifact"])
def test_inspect_junk_json(tmp_path, ck, art, raw, needle, kind):
    bad = _copy(ck if kind == "checkpoint" else art, tmp_path / "bad")
    (bad / ("otaro.json" if kind == "checkpoint" else "otaro_artifact.json")).write_bytes(raw)
    _fails(invoke("inspect", bad), "is corrupt", needle)


@pytest.mark.parametrize("damage, needle", [
    (lambda m: m.pop("architecture"), "'architecture' is missing"),
    (lambda m: m.update(architecture="llama"), "'architecture' must be an object"),
    (lambda m: m.update(precisions=[]), "'precisions' must be an object"),
    (lambda m: m["precisions"]["8"].pop("model_bytes"), "'precisions.8.model_bytes' is missing"),
    (lambda m: m.update(validation={"skipped": False, "results": [{}]}), "missing"),
    (lambda m: m.update(variants=[{"name": "v", "path": "variants/v", "kind": "int", "format": "x",
                                    "files": {"model.onnx": {"sha256": "0", "bytes": 1}}}]), "'variants[0].bits' is missing"),
    (lambda m: m["layers"].update({"model.layers.0.mlp.up_proj": {"in_features": -1, "out_features": 2}}),
     "in_features"),
    (lambda m: m.update(tools=[]), "'tools' must be an object"),
    (lambda m: m.update(float_bytes=None), "'float_bytes' must be a non-negative integer"),
])
def test_inspect_malformed_artifact_manifest(tmp_path, art, damage, needle):
    bad = _copy(art, tmp_path / "bad")
    m = _manifest(bad, "otaro_artifact.json")
    damage(m)
    (bad / "otaro_artifact.json").write_text(json.dumps(m))
    _fails(invoke("inspect", bad), needle)


def test_intact_manifests_still_inspect(ck, art):
    for path in (ck, art):
        r = invoke("inspect", path)
        assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------
# 5. Non-UTF-8 text inside a data folder
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bad_folder(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(SAMPLE_TEXT * 20, encoding="utf-8")
    (folder / "sub" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return folder


def test_non_utf8_file_in_an_eval_folder(tmp_path, bad_folder):
    _fails(invoke("eval", "tiny-llama", "--text", bad_folder, "-o", tmp_path / "ev"), "latin1.txt is not UTF-8")
    assert not (tmp_path / "ev").exists()


def test_non_utf8_file_in_a_finetune_folder(tmp_path, bad_folder):
    _fails(invoke("finetune", "tiny-llama", "--data", bad_folder, "-o", tmp_path / "ft", "--steps", 1),
           "latin1.txt is not UTF-8")
    assert not (tmp_path / "ft").exists()


def test_non_utf8_file_in_a_calibration_folder(tmp_path, bad_folder):
    _fails(invoke("quantize", "tiny-llama", "--method", "gptq", "--calib", bad_folder, "--calib-len", 16,
                  "--calib-samples", 2, "-o", tmp_path / "q"), "latin1.txt is not UTF-8")
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------------------------
# 6. SIGTERM, SIGKILL and stale partial output
# --------------------------------------------------------------------------------------------


def _wait_for(pred, proc, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = pred()
        if found:
            return found
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def _trace_started(parent: Path, name: str):
    def pred():
        for p in parent.glob(f".{name}.*.partial"):
            if (p / ".trace").is_dir():  # traces go inside the partial folder, not /tmp
                return p
        return None

    return pred


def _start_export(ck: Path, out: Path):
    # validation on: the partial folder then lives for seconds, plenty to catch it
    return subprocess.Popen([sys.executable, "-m", "otaro.cli", "export", str(ck), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_sigterm_during_export_leaves_nothing(tmp_path, ck):
    out = tmp_path / "art"
    proc = _start_export(ck, out)
    try:
        partial = _wait_for(_trace_started(tmp_path, "art"), proc)
        if partial is None:
            pytest.fail(f"export ended before its partial folder was seen: {proc.communicate()}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted: no output was written", err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_sigkill_leftovers_are_removed_by_the_next_export(tmp_path, ck):
    out = tmp_path / "art"
    proc = _start_export(ck, out)
    try:
        partial = _wait_for(_trace_started(tmp_path, "art"), proc)
        if partial is None:
            pytest.fail(f"export ended before its partial folder was seen: {proc.communicate()}")
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert partial.is_dir() and str(proc.pid) in partial.name  # what SIGKILL leaves: nobody can clean up
    r = invoke("export", ck, "-o", out, "--no-validate")
    assert r.exit_code == 0, r.output
    assert _leftovers(tmp_path) == [] and not (out / ".trace").exists()
    from otaro.runtime import Runtime

    Runtime.load(out)  # the new artifact is complete and verified


def test_stale_temporaries_of_dead_writers_only(tmp_path):
    from otaro.io import _owner

    host = _owner().rpartition("-")[2]
    dead, alive = _dead_pid(), os.getpid()
    out = tmp_path / "out"
    stale = tmp_path / f".out.{dead}-{host}.abc123_x.partial"
    live = tmp_path / f".out.{alive}-{host}.def456.partial"
    other = tmp_path / f".out.v2.{dead}-{host}.abc123.partial"  # a temporary of another output, "out.v2"
    elsewhere = tmp_path / f".out.{dead}-{'0' * 6 if host != '0' * 6 else '1' * 6}.abc123.partial"  # another host's
    old = tmp_path / f".out.old-{dead}-{host}"
    for p in (stale, live, other, elsewhere, old):
        (p / "sub").mkdir(parents=True)
    stale_file = tmp_path / f".out.json.{dead}-{host}.qwerty12.tmp"
    stale_file.write_text("x")
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert not stale.exists() and live.exists() and other.exists() and elsewhere.exists()
    assert old.exists()  # without the output yet, an old- folder may be the only copy of the last one
    remove_stale(out)
    assert not old.exists()  # now the output exists: the old copy is a leftover
    with atomic_file(tmp_path / "out.json", "w") as f:
        f.write("{}")
    assert not stale_file.exists() and (tmp_path / "out.json").read_text() == "{}"


def test_interrupted_finetune_says_what_it_left(tmp_path, monkeypatch, text_file):
    import otaro.training.trainer as trainer

    real, calls = trainer.train_step, []

    def interrupt_at_step_3(run):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(trainer, "train_step", interrupt_at_step_3)
    out = tmp_path / "ft"
    r = invoke("finetune", "tiny-llama", "--data", text_file, "-o", out, "--steps", 6, "--seq-len", 32,
               "--batch-size", 2, "--save-every", 2, "--eval-every", 100, "--bits", "2,8", "--warmup-steps", 0)
    assert r.exit_code == 130, r.output
    assert f"interrupted: {out}.run/ holds the state to --resume; no checkpoint was written" in r.output, r.output
    assert "nothing was written" not in r.output and "no output was written" not in r.output
    assert not out.exists() and (tmp_path / "ft.run" / "state" / "trainer.json").is_file()
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 7. Small things
# --------------------------------------------------------------------------------------------


def test_validate_tokens_must_be_positive(tmp_path, ck):
    r = invoke("export", ck, "-o", tmp_path / "art", "--validate-tokens", 0)
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output, r.output
    assert not (tmp_path / "art").exists()


def test_written_files_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = checkpoint.save(convert(tiny_model("llama"), "sefp-g16-trunc"), tmp_path / "ck", tokenizer=tiny_tokenizer())
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert path.stat().st_mode & 0o777 == 0o755


def test_quantize_dot_is_named_after_the_folder(tmp_path, hf, monkeypatch):
    monkeypatch.chdir(hf)
    r = invoke("quantize", ".", "--format", "int8-g64-sym")
    assert r.exit_code == 0, r.output
    assert (hf / "hf-int8-g64-sym-rtn" / "otaro.json").is_file(), sorted(p.name for p in hf.iterdir())
    assert not list(hf.glob("-*"))


def test_quantize_help_lists_every_registered_method():
    from otaro.methods import METHODS

    r = invoke("quantize", "--help")
    assert r.exit_code == 0
    listed = r.output.split("Methods:", 1)[1]
    for name, method in METHODS.items():
        assert f"  {name} " in listed, (name, r.output)


def test_export_help_prints_a_plain_percent_sign():
    r = invoke("export", "--help")
    assert r.exit_code == 0 and "~0.5%" in r.output and "%%" not in r.output
