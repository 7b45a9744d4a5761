"""Atomic writes: an interrupted run never leaves a file or folder that looks complete.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on
POSIX within one file system). Folders are built under a temporary sibling name and renamed as
a whole at the end.

Temporary names carry the writer (``.NAME.<pid>-<host>.<random>.partial`` / ``.tmp``): a run
killed by SIGKILL cannot clean up after itself, so the next write of the same output removes
the leftovers of writers that are no longer alive.

Write failures on an output (read-only folder, full disk, a file where a folder should be) are
one :class:`~otaro.errors.OutputError` line naming the output, not a traceback; outputs can be
checked up front with :func:`check_writable_output`, before hours of work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from otaro.errors import OtaroError, OutputError

# errno values that mean "this output cannot be written here", as opposed to a bug.
WRITE_ERRNOS = frozenset(
    getattr(errno, n) for n in ("EACCES", "EPERM", "EROFS", "ENOSPC", "ENOTDIR", "EEXIST", "EDQUOT", "EISDIR",
                                "EFBIG") if hasattr(errno, n)
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Write errors
# --------------------------------------------------------------------------------------------


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (mkdir says "File exists",
    open says "Not a directory": neither names the culprit)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def cannot_write(path: str | os.PathLike, e: OSError | str) -> OutputError:
    reason = e if isinstance(e, str) else (e.strerror or str(e))
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTDIR) and (f := _file_in_the_way(path)):
        reason = f"{f} is a file, not a folder"
    err = OutputError(f"cannot write {path}: {reason}")
    err.path, err.reason = Path(path), reason  # lets an enclosing atomic_dir name its own output
    return err


def _reraise_as(path: Path, tmp: Path, e: BaseException) -> BaseException | None:
    """The error to raise instead of ``e`` for the output ``path`` built in ``tmp``: a raw write
    error, or an OutputError about a file inside ``tmp`` (a user knows ``path``, not ``tmp``)."""
    if isinstance(e, OutputError) and getattr(e, "path", None) is not None and _within(e.path, [tmp]):
        return cannot_write(path, e.reason)
    if _is_write_error(e, [tmp, path]):
        return cannot_write(path, e)
    return None


def _within(name, roots: Iterable[Path]) -> bool:
    try:
        p = Path(os.fsdecode(name)).absolute()
    except (TypeError, ValueError):
        return False
    roots = [Path(r).absolute() for r in roots]
    return any(p == r or r in p.parents for r in roots)


def _is_write_error(e: BaseException, roots: Iterable[Path]) -> bool:
    """An OSError of writing under ``roots``: a write-kind errno, about a file there (or about no
    file at all: ``write()`` failing with ENOSPC names none). An error reading an input keeps
    its own message."""
    if not isinstance(e, OSError) or e.errno not in WRITE_ERRNOS or getattr(e, "otaro_stdout", False):
        return False
    names = [n for n in (e.filename, getattr(e, "filename2", None)) if n is not None]
    return not names or any(_within(n, roots) for n in names)


@contextlib.contextmanager
def os_errors_of_safetensors() -> Iterator[None]:
    """safetensors reports a failed write as ``SafetensorError("... (os error 28)")``: re-raise
    it as the OSError it was, so that the atomic writers name the output (a full disk is one
    line, not a Rust error with a traceback)."""
    try:
        yield
    except Exception as e:
        m = re.search(r"os error (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
        if m:
            raise OSError(int(m[1]), os.strerror(int(m[1]))) from None
        raise


def check_writable_output(path: str | os.PathLike, folder: bool = True) -> None:
    """Fail now, before any work, if ``path`` cannot be written.

    Refuses a file where the output folder should be (or a folder where a file should be), a
    file among its parents, and a nearest existing parent where a probe file cannot be created
    (read-only, permissions). Creates no folder; the probe is removed at once."""
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise OutputError(f"cannot write {path}: a file is in the way (the output is a folder)")
    if path.exists() and not folder and path.is_dir():
        raise OutputError(f"cannot write {path}: a folder is in the way (the output is a file)")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    probes = [parent] + ([path] if folder and path.is_dir() else [])  # eval writes inside an existing folder
    for where in probes:
        try:
            fd, probe = tempfile.mkstemp(prefix=f".otaro-probe-{os.getpid()}.", dir=where)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise cannot_write(path, e) from None


# --------------------------------------------------------------------------------------------
# Outputs over inputs
# --------------------------------------------------------------------------------------------


def refuse_output_over_inputs(output: str | os.PathLike, inputs: Iterable, flag: str = "-o") -> None:
    """Refuse an output that is one of the inputs or holds one: replacing it (``--overwrite``)
    would delete the input before or while it is read. Inputs that are not local paths (model
    names, ``corpus:NAME``) are skipped. Symlinks are resolved: a link to the input is the input."""
    out = Path(output).resolve()
    for spec in inputs:
        if spec is None:
            continue
        p = Path(os.fspath(spec))
        if not p.exists():
            continue
        inp = p.resolve()
        if inp == out:
            raise OtaroError(f"output {output} is the input {spec}: writing it would replace the input; "
                             f"choose another {flag}")
        if out in inp.parents:
            raise OtaroError(f"output {output} holds the input {spec}: replacing it would delete the input; "
                             f"choose another {flag}")


# --------------------------------------------------------------------------------------------
# Stale temporaries of dead writers
# --------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _owner() -> str:
    """``<pid>-<host>`` of this process, for temporary names. The host part (a hash of the
    host name) keeps a writer on another machine or container sharing the folder, whose pid
    means nothing here, from having its live temporaries taken for a dead writer's."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    return f"{os.getpid()}-{host}"


def _temp_name(name: str, suffix: str) -> re.Pattern:
    # mkstemp/mkdtemp's random part is [a-z0-9_], never a dot: ".art.5.<pid>-..." cannot pass
    # for a temporary of "art".
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)-([0-9a-f]{{6}})\.[a-z0-9_]+{re.escape(suffix)}$")


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what dead writers of ``path`` on this host left beside it: ``.NAME.<pid>-<host>.*.partial``
    folders, ``.NAME.<pid>-<host>.*.tmp`` files, and ``.NAME.old-<pid>-<host>`` folders once ``path`` exists
    (without ``path`` an ``old`` folder may be the only copy of the previous output: kept)."""
    path = Path(path)
    parent, name = path.parent, path.name
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return []
    patterns = [_temp_name(name, ".partial"), _temp_name(name, ".tmp"),
                re.compile(rf"^\.{re.escape(name)}\.old-(\d+)-([0-9a-f]{{6}})$")]
    host = _owner().rpartition("-")[2]
    removed = []
    for p in entries:
        for k, pat in enumerate(patterns):
            m = pat.match(p.name)
            if not m or m[2] != host or pid_alive(int(m[1])):
                continue
            if k == 2 and not path.exists():
                continue
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            break
    return removed


# --------------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _is_write_error(e, [path.parent]):
            raise cannot_write(path, e) from None
        raise
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (new := _reraise_as(path, Path(tmp), e)) is not None:
            raise new from None
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _normal_permissions(root: Path) -> None:
    """Files 0666 and folders 0777 less the umask, like any program's output: mkdtemp makes
    0700 and some writers (safetensors) make 0600 files, which other users could not read."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` when the block succeeds.

    Refuses an existing ``path`` unless ``overwrite``; the old folder is removed only after the
    new one is complete, so a failure leaves the previous output untouched. Leftovers of dead
    writers of the same ``path`` are removed first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {path}: a file is in the way (the output is a folder)")
    if path.exists() and not overwrite:
        raise OtaroError(f"output folder {path} already exists (pass --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".partial", dir=path.parent))
    except OSError as e:
        if _is_write_error(e, [path.parent]):
            raise cannot_write(path, e) from None
        raise
    try:
        yield tmp
        _normal_permissions(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{_owner()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (new := _reraise_as(path, tmp, e)) is not None:
            raise new from None
        raise
