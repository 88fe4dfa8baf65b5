"""Progress on stderr for long commands.

On a terminal: one line redrawn in place (and every half second, so the clock moves during a
long MILP). Anywhere else (CI, nohup, a log file): plain lines, one when the work starts, then
one every `VERIKIT_PROGRESS_INTERVAL` seconds (default 15) while it runs, and one at the end,
so a log shows a long run is alive. `Progress.echo(text)` prints a message without garbling
the bar; warnings printed by the CLI go through it too.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

_ACTIVE: Optional["Progress"] = None


def default_interval() -> float:
    try:
        return max(0.05, float(os.environ.get("VERIKIT_PROGRESS_INTERVAL", "15")))
    except ValueError:
        return 15.0


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """`1 sample`, `2 samples`."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


class Progress:
    def __init__(self, total: int, label: str, unit: str = "", enabled: bool = True, stream=None,
                 interval: Optional[float] = None):
        self.total, self.label, self.unit = max(0, int(total)), label, unit
        self.n, self.info = 0, ""
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.5 if self.tty else (interval or default_interval())
        self.t0 = time.perf_counter()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._drawn = False

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Progress":
        global _ACTIVE
        if self.enabled:
            _ACTIVE = self
            if not self.tty:
                self._emit(self._line(start=True))
            else:
                self._draw()
            self._thread = threading.Thread(target=self._tick, name="verikit-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        global _ACTIVE
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            with self._lock:
                if self.tty:
                    self._draw()
                    self.stream.write("\n")
                else:
                    self._emit(self._line())
                self.stream.flush()
        if _ACTIVE is self:
            _ACTIVE = None

    # -------------------------------------------------------------- updates
    def update(self, k: int = 1, info: Optional[str] = None) -> None:
        with self._lock:
            self.n += k
            if info is not None:
                self.info = info
            if self.enabled and self.tty and self._thread is not None:
                self._draw()

    def echo(self, text: str) -> None:
        """Print a line (a warning, a note) above the bar."""
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write("\r\033[K")
            self.stream.write(text.rstrip("\n") + "\n")
            if self.tty and self._thread is not None:
                self._draw()
            self.stream.flush()

    # -------------------------------------------------------------- drawing
    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self.tty:
                    self._draw()
                else:
                    self._emit(self._line())

    def _eta(self, elapsed: float) -> str:
        if not self.n or self.n >= self.total:
            return ""
        return _duration(elapsed / self.n * (self.total - self.n))

    def _draw(self) -> None:
        el = time.perf_counter() - self.t0
        frac = self.n / self.total if self.total else 1.0
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta = self._eta(el)
        line = (f"{self.label} [{bar}] {self.n}/{self.total}" + (f" {self.info}" if self.info else "")
                + f"  {_duration(el)}" + (f" (about {eta} left)" if eta else ""))
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
        self._drawn = True

    def _line(self, start: bool = False) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if start:
            return f"{self.label}: {self.total}{unit}"
        el = time.perf_counter() - self.t0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = self._eta(el)
        return (f"{self.label}: {self.n}/{self.total}{unit} done ({pct:.0f}%)" + (f", {self.info}" if self.info else "")
                + f"; {_duration(el)} elapsed" + (f", about {eta} left" if eta else ""))

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


def set_active_info(text: str) -> None:
    """Show `text` as the info of the active progress bar, if there is one (e.g. a long
    branch-and-bound search inside one sample: domains left, best global lower bound)."""
    if _ACTIVE is not None and _ACTIVE.enabled:
        _ACTIVE.update(0, info=text)


def echo_above_progress(text: str, stream=None) -> None:
    """Print a line on stderr, above the active progress bar if there is one."""
    if _ACTIVE is not None and _ACTIVE.enabled:
        _ACTIVE.echo(text)
    else:
        s = stream or sys.stderr
        s.write(text.rstrip("\n") + "\n")
        s.flush()
