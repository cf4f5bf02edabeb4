"""The progress line of ``push`` and ``pull`` on a terminal (size, rate, ETA), redrawn
at most every ``PROGRESS_INTERVAL``; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import IO, Optional


PROGRESS_INTERVAL = 0.1    # seconds between redraws


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "%d" % n


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
    return "%d:%02d" % (seconds // 60, seconds % 60)


class Progress:
    """Progress bar (bytes, rate, ETA) on a terminal; silent when ``out`` is not a TTY.

    ``start(name, total, done)`` begins a file, ``update(n)`` adds bytes,
    ``finish()`` ends the file's line.  Totals are kept for the summary.
    """

    def __init__(self, out: Optional[IO[str]] = None, enabled: Optional[bool] = None,
                 width: int = 24) -> None:
        self.out = out if out is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.out, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.width = width
        self.name = ""
        self.total = 0
        self.done = 0
        self.base = 0
        self.t0 = time.monotonic()
        self.last_draw = 0.0
        self.files = 0
        self.bytes = 0

    def start(self, name: str, total: int, done: int = 0) -> None:
        self.name, self.total, self.done, self.base = name, total, done, done
        self.t0 = time.monotonic()
        self.last_draw = 0.0
        self._draw(force=True)

    def update(self, n: int) -> None:
        self.done += n
        self.bytes += n
        self._draw()

    def finish(self) -> None:
        self.files += 1
        self._draw(force=True)
        if self.enabled:
            self.out.write("\n")
            self.out.flush()

    def abort(self) -> None:
        if self.enabled and self.last_draw:
            self.out.write("\n")
            self.out.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = (self.done - self.base) / elapsed
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        eta = _eta((self.total - self.done) / rate) if rate > 0 and self.done < self.total \
            else "--:--" if self.done < self.total else _eta(elapsed)
        name = self.name if len(self.name) <= 30 else "..." + self.name[-27:]
        return "%-30s [%s] %3d%% %10s/%-10s %10s/s %s" % (
            name, bar, int(frac * 100), _human(self.done), _human(self.total), _human(rate), eta)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < PROGRESS_INTERVAL:
            return
        self.last_draw = now
        self.out.write("\r" + self.line())
        self.out.flush()


class _NoProgress(Progress):
    def __init__(self) -> None:
        super().__init__(out=sys.stderr, enabled=False)
