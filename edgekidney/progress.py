"""One progress display for every long stage: a live bar on a terminal, plain lines in a pipe.

- On a terminal (stdout and stderr both ttys): one bar line on stderr with count, rate and ETA,
  redrawn in place; a log line first erases the bar, is printed on stdout, and the bar is drawn again
  below it. When a stage ends its bar is erased, so only log lines stay on the screen.
- Anywhere else (a pipe, a file, a test runner): log lines only, each printed once, no ANSI codes,
  no carriage returns; stages print nothing.

Commands log through :func:`echo` and show stages through :func:`stage`, so that the bar and the
lines cannot run into each other. No torch here (the runtime's ``infer`` uses it too).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

CLEAR_LINE = "\r\x1b[2K"
# control characters a file name may carry into a line (an escape sequence would drive the terminal):
# shown as \x.. escapes; newlines and tabs of the message itself stay
_FIELD = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)]}  # one field of a table row
_CONTROLS = {c: text for c, text in _FIELD.items() if c not in (0x09, 0x0a)}


def printable(text: str) -> str:
    """``text`` with its control characters (ESC, CR, ...) escaped, for a terminal or a log."""
    return text.translate(_CONTROLS)


def one_line(text: str) -> str:
    """A value for one field of a table row: its newlines and tabs escaped too (a file name may hold
    them, and would add a row of its own)."""
    return text.translate(_FIELD)


def is_terminal(out: TextIO, err: TextIO) -> bool:
    def tty(s: TextIO) -> bool:
        try:
            return s.isatty()
        except (AttributeError, ValueError):
            return False

    return tty(out) and tty(err) and os.environ.get("TERM", "") != "dumb"


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def format_rate(done: int, elapsed: float, unit: str) -> str:
    if done <= 0 or elapsed <= 0:
        return f"-- {unit}/s"
    rate = done / elapsed
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"


def render_bar(description: str, done: int, total: int, elapsed: float, unit: str, status: str, width: int) -> str:
    """``epoch 2/10 ━━━━━───── 12/25 batch · 1.9 batch/s · ETA 0:07 · loss 0.412`` cut to ``width``."""
    total = max(total, 1)
    frac = min(1.0, done / total)
    eta = format_seconds((total - done) * elapsed / done) if done else "--:--"
    cells = 20
    filled = int(frac * cells)
    bar = "━" * filled + "─" * (cells - filled)
    parts = [f"{description} {bar} {done}/{total} {unit}", format_rate(done, elapsed, unit),
             f"{format_seconds(elapsed)} elapsed, ETA {eta}"]
    if status:
        parts.append(status)
    text = " · ".join(parts)
    return text if len(text) < width else text[: max(1, width - 2)] + "…"


class Stage:
    """A long stage with a known number of steps; use as a context manager."""

    def __init__(self, display: "Display", description: str, total: int, unit: str) -> None:
        self.display, self.description, self.total, self.unit = display, description, total, unit
        self.done, self.status = 0, ""
        self.t0 = time.perf_counter()
        self._drawn_at = 0.0

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        now = time.perf_counter()
        if self.done >= self.total or now - self._drawn_at >= self.display.min_interval:
            self._drawn_at = now
            self.display._draw()

    def line(self, width: int) -> str:
        return render_bar(self.description, self.done, self.total, time.perf_counter() - self.t0, self.unit,
                          self.status, width)

    def __enter__(self) -> "Stage":
        self.display._begin(self)
        return self

    def __exit__(self, *exc) -> None:
        self.display._end(self)


class Display:
    """Streams are looked up at each write (tests and CLI runners replace sys.stdout/sys.stderr)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, live: bool | None = None,
                 min_interval: float = 0.1) -> None:
        self._out, self._err, self._live = out, err, live
        self.min_interval = min_interval
        self._stage: Stage | None = None
        self._bar_on_screen = False

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    @property
    def live(self) -> bool:
        return is_terminal(self.out, self.err) if self._live is None else self._live

    def log(self, message: str, err: bool = False) -> None:
        """One permanent line on stdout, or stderr with ``err`` (above the bar on a terminal)."""
        live = self.live
        if live:
            self._erase()
        stream = self.err if err else self.out
        stream.write(f"{printable(message)}\n")
        stream.flush()
        if live and self._stage is not None:
            self._draw()

    def stage(self, description: str, total: int, unit: str = "it") -> Stage:
        return Stage(self, description, total, unit)

    # -- internals -------------------------------------------------------------------------------
    def _begin(self, stage: Stage) -> None:
        self._stage = stage
        self._draw()

    def _end(self, stage: Stage) -> None:
        if self._stage is stage:
            self._erase()
            self._stage = None

    def _draw(self) -> None:
        if self._stage is None or not self.live:
            return
        width = shutil.get_terminal_size((100, 24)).columns
        self.err.write(CLEAR_LINE + self._stage.line(width))
        self.err.flush()
        self._bar_on_screen = True

    def _erase(self) -> None:
        if self._bar_on_screen:
            self.err.write(CLEAR_LINE)
            self.err.flush()
            self._bar_on_screen = False


_display = Display()


def display() -> Display:
    return _display


def echo(message: str, err: bool = False) -> None:
    """Log one line through the process's display (never into a live bar)."""
    _display.log(message, err=err)


def stage(description: str, total: int, unit: str = "it") -> Stage:
    """A bar for ``total`` steps on a terminal, nothing in a pipe: ``with stage(...) as s: s.advance()``."""
    return _display.stage(description, total, unit)
