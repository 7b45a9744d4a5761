"""Progress for long work, visible both on a terminal and in a log.

On a TTY this is a tqdm bar. When stderr is not a TTY (CI logs, ``make demo > log``, a job
scheduler) tqdm's carriage-return bar is either hidden or one unreadable line, so instead a
plain line is printed every ``OTARO_PROGRESS_SECONDS`` seconds (default 30) and at the end:

    eval: 120/480 windows (25%), 2m10s elapsed, ETA 6m30s [int4 b=4]

Both expose the small part of tqdm's interface the project uses (``update``,
``set_postfix_str``, ``total``, context manager), so callers do not care which one they got.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("OTARO_PROGRESS_SECONDS", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class LogProgress:
    """A tqdm stand-in that prints one line per interval (never a carriage return)."""

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0, file=None,
                 interval: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = file if file is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._start_n = self._emitted_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def write(self, msg: str) -> None:
        try:
            print(msg, file=self.file, flush=True)
        except (OSError, ValueError):
            pass

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        done = self.n - self._start_n
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"ETA {tqdm.format_interval(elapsed / done * (self.total - self.n))}")
        text = ", ".join(parts)
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _emit(self, now: float | None = None) -> None:
        self._emitted_n = self.n
        try:
            print(self.line(now), file=self.file, flush=True)
        except (OSError, ValueError):  # a closed or full log must not kill the work it reports on
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._emitted_n:  # the final count, unless the last line already said it
                self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress(total=None, desc: str = "", unit: str = "it", enabled: bool = True, initial: int = 0, leave: bool = False):
    """A progress reporter: tqdm on a terminal, periodic lines in a log, nothing if disabled."""
    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=True)
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream)
        bar.write = lambda msg: tqdm.write(msg, file=stream)  # above the bar, not through it
        return bar
    return LogProgress(total=total, desc=desc, unit=unit, initial=initial, file=stream)
