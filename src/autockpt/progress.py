"""A one-line progress display for large saves and restores.

```python
rep = ProgressReporter(total_bytes=size, label="saving step 100", enabled=True)
for chunk in chunks:
    write(chunk)
    rep.update(len(chunk))
rep.close()
```

It draws only when asked (``enabled``), when the stream is a terminal and when the transfer is at least
``min_bytes`` (64 MiB by default); otherwise every call does nothing. The line is redrawn in place with
``\\r`` at most a few times a second and finished with a newline by :meth:`ProgressReporter.close`. The
summary line that is logged after every save and restore is the caller's business (the ``autockpt`` logger).

One job: progress on the terminal. Imports nothing of autockpt.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

DEFAULT_MIN_BYTES = 64 * 2**20
_REDRAW_SECONDS = 0.2


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressReporter:
    """Shows ``label: done / total (pct) rate`` on one terminal line while bytes move.

    Args:
        total_bytes: how many bytes the whole transfer moves.
        label: what is moving, e.g. ``"saving step 100"``.
        enabled: the caller's ``progress=True``; when False nothing is ever written.
        stream: where to draw (standard error by default); nothing is written unless it is a TTY.
        min_bytes: transfers smaller than this draw nothing.
    """

    def __init__(
        self,
        total_bytes: int,
        label: str,
        enabled: bool,
        stream: TextIO | None = None,
        min_bytes: int = DEFAULT_MIN_BYTES,
    ) -> None:
        self.total = max(int(total_bytes), 0)
        self.label = label
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.active = bool(enabled) and self.total >= min_bytes and _is_tty(self.stream)
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._width = 0
        self._closed = False

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / max(time.monotonic() - self._start, 1e-9)

    def _line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {format_bytes(self.done)} / {format_bytes(self.total)} ({pct:.0f}%) "
                f"{self.rate / 1e6:.1f} MB/s")

    def _draw(self) -> None:
        line = self._line()
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        try:
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop drawing, never fail the save
            self.active = False

    def update(self, nbytes: int) -> None:
        """Record ``nbytes`` more bytes moved; redraws at most every 0.2 s."""
        if self._closed:
            return
        self.done = min(self.done + max(int(nbytes), 0), self.total) if self.total else self.done + int(nbytes)
        if not self.active:
            return
        now = time.monotonic()
        if now - self._last_draw >= _REDRAW_SECONDS:
            self._last_draw = now
            self._draw()

    def close(self) -> None:
        """Draw the final state and end the line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.active:
            self._draw()
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
