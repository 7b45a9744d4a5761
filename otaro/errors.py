"""User-facing errors.

An ``OtaroError`` is a mistake the user can fix (bad path, bad bit-width, corrupt file). The CLI
prints its message on one line and exits non-zero, without a traceback; anything else is a bug
and keeps its traceback.
"""


class OtaroError(Exception):
    """A problem with the user's input, explained in one line."""


class FormatError(OtaroError, ValueError):
    """Invalid number-format request or data (bit-width, group size, non-finite weights)."""


class CheckpointError(OtaroError):
    """A checkpoint or artifact that is missing, corrupt, truncated or not ours."""


class UnsupportedArchitecture(OtaroError):
    """A model whose architecture has no registered adapter."""


class OutputError(OtaroError):
    """An output location that cannot be written (read-only, full, a file in the way)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, carrying what the interrupted command left on disk.

    A ``KeyboardInterrupt`` on purpose: every ``except BaseException`` cleanup (atomic writers)
    runs as for a plain Ctrl-C; the CLI prints ``left`` instead of "no output was written"."""

    def __init__(self, left: str):
        super().__init__(left)
        self.left = left
