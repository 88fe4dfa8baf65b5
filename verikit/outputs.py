"""Checks of the paths a command reads and writes, made before any work starts, and atomic writes.

Every command validates all of its output paths up front, so a typo in `--plot` or `-o` is a
one-line error at once instead of a traceback after an hour of work. Writability is tested by
creating (and removing) a probe file, which is also right for root and read-only mounts, where
`os.access` says yes.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional

from .errors import VerikitError


def _probe_dir(directory: str, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".verikit-probe-", dir=directory)
    except OSError as e:
        raise VerikitError(f"{what}: cannot write in {directory or '.'} ({e.strerror})") from None
    os.close(fd)
    os.remove(probe)


def check_output_file(path: str, flag: str) -> str:
    """`path` can be written: not a directory, its folder exists and is writable, and an
    existing file there is writable (it is not touched now)."""
    what = f"{flag} {path}"
    if not path or not str(path).strip():
        raise VerikitError(f"{flag}: empty path")
    path = str(path)
    if os.path.isdir(path):
        raise VerikitError(f"{what} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise VerikitError(f"{what}: folder {os.path.dirname(path) or parent} does not exist")
    if not os.path.isdir(parent):
        raise VerikitError(f"{what}: {os.path.dirname(path)} is not a folder")
    if os.path.exists(path):
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            raise VerikitError(f"{what}: cannot write ({e.strerror})") from None
    else:
        _probe_dir(parent, what)
    return path


def check_output_dir(path: str, flag: str) -> str:
    """`path` is (or can be created as) a writable folder; missing parents are created later."""
    what = f"{flag} {path}"
    if not path or not str(path).strip():
        raise VerikitError(f"{flag}: empty path")
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise VerikitError(f"{what} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise VerikitError(f"{what}: {existing} is a file, not a folder")
    _probe_dir(existing, what)
    return path


def check_input_file(path: str, flag: str, kind: str = "file") -> str:
    """`path` exists, is a file (not a folder) and can be read."""
    what = f"{flag} {path}" if flag else str(path)
    if not path or not str(path).strip():
        raise VerikitError(f"{flag}: empty path")
    path = str(path)
    if not os.path.exists(path):
        raise VerikitError(f"{kind} not found: {path}" + (f" ({flag})" if flag else ""))
    if os.path.isdir(path):
        raise VerikitError(f"{what} is a directory, not a {kind}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise VerikitError(f"{what}: cannot read ({e.strerror})") from None
    return path


@contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = "utf-8", newline: Optional[str] = None) -> Iterator:
    """Write to a temporary file beside `path` and move it into place when the block ends
    without error: a run killed mid-write leaves the old file (or none), never half of one.
    Through a symlink the target is replaced; a device or pipe (/dev/null, /dev/stdout) is
    written directly, never replaced by a regular file."""
    path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        text = "b" not in mode
        with open(path, mode, encoding=encoding if text else None, newline=newline if text else None) as f:
            yield f
        return
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=encoding if text else None, newline=newline if text else None) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
