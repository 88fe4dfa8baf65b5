"""Keep freed memory in the process instead of handing it back to the OS at once (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and
unmaps it on free, so each large tensor of a bound computation (CNN7's forward coefficients
and row blocks: 80-180 MB each, allocated hundreds of times per call) is page-faulted in from
zero again, at a few GB/s. Serving them from the heap and keeping up to 1 GiB of freed memory
at its top makes those allocations reuse pages already mapped: CNN7 CROWN at batch 1 ran
×1.12-1.22 faster (benchmarks/bench_allocator.py, 2026-12-07). The price is a higher peak,
since freed blocks are reused less tightly than fresh mappings (1.46 -> 1.79 GB in that run),
and a resident size that may stay up to 1 GiB above what is in use between calls
(`malloc_trim` hands it back).

The `verikit` console script turns this on for its process (set VERIKIT_KEEP_FREED_MEMORY=0
to keep glibc's defaults) and, through that variable, for the Ray workers of a local
`--workers N` run (certify/workers.py); library users call `keep_freed_memory()` themselves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, to restore
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
KEEP_BYTES = 1 << 30  # freed memory kept at the top of the heap

ENV = "VERIKIT_KEEP_FREED_MEMORY"

_libc = None


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version"):
                    _libc = lib
            except OSError:
                pass
    return _libc or None


def keep_freed_memory(enable: bool = True) -> bool:
    """Serve large allocations from the heap and keep freed memory (enable=True), or restore
    glibc's defaults and hand free memory back (enable=False). Returns whether the allocator
    took the setting (False where the C library is not glibc: nothing changes there)."""
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    else:
        ok = libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
        libc.malloc_trim(0)
    return ok


def keep_freed_memory_from_env(default: bool = True) -> bool:
    """keep_freed_memory() unless the environment turns it off (VERIKIT_KEEP_FREED_MEMORY=0);
    with default=False only where it says 1 (a worker process of a command that took it).
    Once taken, the environment says 1, so that worker processes started from here follow."""
    value = os.environ.get(ENV, "1" if default else "0").strip().lower()
    if value in ("0", "false", "no", "off", ""):
        return False
    if not keep_freed_memory(True):
        return False
    os.environ[ENV] = "1"
    return True
