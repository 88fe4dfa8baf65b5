"""Ctrl-C (SIGINT) and SIGTERM: stop long work promptly and keep what is finished.

- The CLI makes SIGTERM raise `Terminated`, a `KeyboardInterrupt` subclass, so every
  `except KeyboardInterrupt` that saves finished work handles both signals alike; the exit
  code is 130 for SIGINT and 143 for SIGTERM (128 + the signal number, as shells report it).
- Native solver calls do not return to Python until they finish, so a signal cannot raise
  there. `deferred_signals(stop)` records the signal instead, calls `stop()` (which asks the
  solver to end its search), and raises the matching exception once the call has returned.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 128 + signal.SIGINT


def _raise_terminated(signum, frame):
    raise Terminated()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises `Terminated` (signal handlers live in the main thread only)."""
    if not _in_main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class deferred_signals:
    """Context manager for a native call: SIGINT/SIGTERM call `stop()` and are re-raised (as
    KeyboardInterrupt / Terminated) when the block ends. Only signals that would raise anyway
    are taken over (the default SIGINT handler, the CLI's SIGTERM handler); in other threads,
    or when the process handles signals its own way, this does nothing."""

    def __init__(self, stop: Callable[[], None]):
        self.stop = stop
        self.received: Optional[int] = None
        self._saved: dict = {}

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
        try:
            self.stop()
        except Exception:  # asking a solver to stop must never break the caller
            pass

    def __enter__(self):
        if _in_main_thread():
            for sig, ours in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_terminated)):
                if signal.getsignal(sig) is ours:
                    self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved = {}
        if self.received is not None and exc_type is None:
            raise Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()
        return False
