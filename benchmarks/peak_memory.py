"""Peak resident memory of a block of code, measured in the same process (for the benchmarks).

    with PeakRSS() as p:
        work()
    print(p.gb)   # peak RSS above the level at entry, in GB
"""
import ctypes
import os
import threading
import time


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread
    (torch kernels release the GIL). Free heap memory is handed back to the OS first so that the
    entry level is what is really in use."""

    def __init__(self):
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.gb = (self.peak - self.base) / 1e9
