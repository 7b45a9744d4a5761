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
