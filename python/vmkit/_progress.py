"""Progress on a terminal: a spinner, or a bar when the total is known, on stderr.

Drawn only when the stream is a terminal (not a pipe or a file, not ``TERM=dumb``)
and the caller is not quiet, so logs and scripts see nothing of it; stdout is never
touched. A ticker thread redraws at most ``1 / interval`` times a second (10 by
default), so ``update()`` only records the state and costs the operation nothing.
The line is cleared when the block ends. ``NO_COLOR`` drops the colour.

    with Progress("snapshot", total=size, unit="bytes", probe=written) as progress:
        ...
        progress.update(label="snapshot: devices")
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "bytes_under", "enabled"]

_SPINNER = "-\\|/"
_BAR_CELLS = 24


def enabled(stream: TextIO | None = None, *, quiet: bool = False) -> bool:
    """Whether progress would be drawn on ``stream`` (default stderr)."""
    if quiet:
        return False
    stream = sys.stderr if stream is None else stream
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # closed or a stand-in without isatty
        return False


def bytes_under(directory: str | os.PathLike[str]) -> float | None:
    """The bytes allocated to the files under ``directory`` (a snapshot's memory
    file is sparse: what it holds so far, not its size); None if it cannot be read
    now (a file renamed or removed meanwhile), for a ``probe``."""
    total = 0
    try:
        for root, _dirs, files in os.walk(directory):
            for name in files:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    except OSError:
        return None
    return float(total)


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    return f"{value:g}{' ' + unit if unit else ''}"


class Progress:
    """A context manager drawing ``label`` with a spinner (or a bar when ``total``
    is known) and the elapsed time on ``stream`` (default stderr) while its block
    runs; it draws nothing unless :func:`enabled`.

    ``probe``, when given, is called by the ticker thread before each redraw and
    returns the amount done (e.g. the bytes a file has grown to), for operations
    that cannot report it themselves; it must be cheap and must not raise.
    """

    def __init__(
        self,
        label: str,
        *,
        total: float | None = None,
        unit: str = "",
        probe: Callable[[], float | None] | None = None,
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = 0.1,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.active = enabled(self.stream, quiet=quiet)
        self.label = label
        self.total = total
        self.unit = unit
        self.done: float | None = None
        self._probe = probe
        self._interval = max(interval, 0.1)
        self._colour = not os.environ.get("NO_COLOR")  # no-color.org: set and not empty
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._frame = 0
        self._drawn = 0  # width of what is on the line now

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        self._stop.clear()
        if self.active:
            with self._lock:
                self._draw()  # at once: what runs shows even if it is quick
            self._thread = threading.Thread(target=self._tick, name="vmkit-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops redrawing and clears the line (also done when the block ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._clear()

    def update(
        self, done: float | None = None, *, label: str | None = None, total: float | None = None
    ) -> None:
        """Records progress; the ticker thread draws it (cheap: no output here)."""
        if done is not None:
            self.done = done
        if label is not None:
            self.label = label
        if total is not None:
            self.total = total

    def track(
        self,
        total: float | None,
        unit: str = "",
        probe: Callable[[], float | None] | None = None,
    ) -> None:
        """Starts measuring a new quantity (``total`` None: a spinner again)."""
        with self._lock:
            self.total, self.unit, self._probe, self.done = total, unit, probe, None

    def note(self, line: str) -> None:
        """Prints ``line`` on the stream above the progress line (on a terminal), or
        just prints it (elsewhere): a line that stays, such as a finished step.
        Quiet prints nothing."""
        if self.quiet:
            return
        with self._lock:
            self._clear()
            self._write(line + "\n")
            if self.active and not self._stop.is_set():
                self._draw()

    @contextlib.contextmanager
    def above(self) -> Iterator[None]:
        """Clears the progress line while the block writes elsewhere on the terminal
        (a result line on stdout), then draws it again below."""
        with self._lock:
            self._clear()
            yield
            if self.active and not self._stop.is_set():
                self._draw()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    # -- drawing (under the lock) ------------------------------------------------

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            if self._probe is not None:
                value = self._probe()
                if value is not None:
                    self.done = value
            with self._lock:
                if not self._stop.is_set():
                    self._draw()

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return max(columns - 1, 20) if columns else 79  # 0: a terminal that has not said

    def _text(self, label: str) -> tuple[str, str]:
        """The line as plain text, and with colour where colour is on."""
        elapsed = f"{self.elapsed:.1f}s"
        done, total = self.done, self.total
        if total:
            done = done or 0.0
            fraction = min(max(done / total, 0.0), 1.0)
            filled = int(fraction * _BAR_CELLS)
            bar = "#" * filled + "." * (_BAR_CELLS - filled)
            if self.unit == "bytes":
                amount = f"{_amount(done, self.unit)} / {_amount(total, self.unit)}"
            else:
                amount = f"{done:g}/{_amount(total, self.unit)}"
            head, tail = f"{label} [", f"] {fraction:4.0%} {amount} {elapsed}"
            coloured = f"{head}\x1b[36m{bar}\x1b[0m{tail}" if self._colour else head + bar + tail
            return head + bar + tail, coloured
        spin = _SPINNER[self._frame % len(_SPINNER)]
        amount = f" {_amount(done, self.unit)}" if done is not None else ""
        text = f"{label} {spin}{amount} {elapsed}"
        return text, text

    def _draw(self) -> None:
        self._frame += 1
        plain, text = self._text(self.label)
        width = self._width()
        if len(plain) > width:  # a wrapped line could not be redrawn in place: shorten
            room = len(self.label) - (len(plain) - width) - 3
            if room >= 8:
                plain, text = self._text(self.label[:room] + "...")
            else:
                plain = text = plain[: width - 3] + "..."
        pad = " " * max(self._drawn - len(plain), 0)
        self._write(f"\r{text}{pad}")
        self._drawn = len(plain)

    def _clear(self) -> None:
        if self._drawn:
            self._write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth failing for
            self.active = False
