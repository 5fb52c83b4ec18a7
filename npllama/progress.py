"""Progress of long work (a conversion, a long prefill) on stderr.

On a terminal it is one line redrawn in place; in a log (stderr not a TTY) it is a line
every few seconds and one at the end, so that a CI log gets a handful of lines rather than
one per tensor or per chunk. The clock is an argument so that tests can drive it."""
from __future__ import annotations

import sys
import time

from .errors import printable


class Progress:
    """`update(done, detail)` as the work goes, `close()` when it is over. total and done
    count `unit`s; scale shows them divided (1e9 with unit "GB" for bytes)."""

    def __init__(self, label: str, total: int, unit: str, scale: float = 1.0, stream=None,
                 every: float = 5.0, clock=time.monotonic):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.1 if self.tty else every       # a redraw is cheap; a log line is not
        self.clock, self.t0 = clock, clock()
        self.shown, self.done, self.detail, self.printed = self.t0, 0, "", False

    def _amount(self, n: float) -> str:
        return f"{n:,.0f}" if self.scale == 1 else f"{n / self.scale:.2f}"

    def line(self) -> str:
        dt = max(self.clock() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tail = f", ETA {eta:.0f} s" if self.done < self.total and eta != float("inf") else f", {dt:.1f} s"
        detail = f"  {printable(self.detail)}" if self.detail else ""
        return (f"{self.label}: {self._amount(self.done)} / {self._amount(self.total)} {self.unit}, "
                f"{self._amount(rate)} {self.unit}/s{tail}{detail}")

    def _show(self, end: str) -> None:
        print(("\r\x1b[K" if self.tty else "") + self.line(), end=end, file=self.stream, flush=True)
        self.printed = True

    def update(self, done: int, detail: str = "") -> None:
        self.done, self.detail = done, detail
        now = self.clock()
        if now - self.shown >= self.every:
            self.shown = now
            self._show("" if self.tty else "\n")

    def close(self, summary: bool = False) -> None:
        """The final line: on a terminal (it ends the redrawn one), in a log if the work took
        long enough to have printed something or a summary is wanted (quick work stays silent)."""
        if self.tty or self.printed or summary:
            self.detail = ""
            self._show("\n")
