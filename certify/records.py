"""Per-sample result records, streamed to a JSON-lines file.

Each finished sample is appended as one line and flushed at once, so an interrupted run keeps
everything finished so far. With `resume=True` the records already in the file are read back
(a half-written last line from a killed run is cut off), checked field by field, and their
(eps, index) pairs skipped. Without it the file is replaced, but only when the first record is
written: a run that fails or is interrupted before finishing any sample leaves it untouched.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Iterable, Optional

from verikit.errors import VerikitError

STATUSES = ("verified", "falsified", "unknown", "misclassified", "error")  # error: a parallel task that kept failing


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# field -> (required, check, what it must be)
_FIELDS = {
    "index": (True, lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "eps": (True, lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "status": (True, lambda v: v in STATUSES, "one of " + ", ".join(STATUSES)),
    "label": (True, _is_int, "an integer"),
    "prediction": (True, lambda v: _is_int(v) or v is None, "an integer (null in error records)"),
    "time": (True, lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "times": (True, lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(t) for k, t in v.items()),
              "an object of stage -> seconds"),
    "by": (False, lambda v: v is None or isinstance(v, str), "a stage name or null"),
    "margin": (False, lambda v: v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v),
               "a number or null"),
    "note": (False, lambda v: isinstance(v, str), "a string"),
    "model": (False, lambda v: v is None or isinstance(v, str), "a path"),
    "search": (False, lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()),
               "an object of domain -> {visited, depth}"),
}


def check_record(rec, where: str) -> None:
    """VerikitError naming the file:line and the field unless `rec` is a well-formed record."""
    if not isinstance(rec, dict):
        raise VerikitError(f"{where}: not a verikit result record (a JSON object is expected)")
    for name, (required, ok, what) in _FIELDS.items():
        if name not in rec:
            if required:
                raise VerikitError(f"{where}: record has no {name!r} field; not a verikit results file?")
            continue
        if not ok(rec[name]):
            raise VerikitError(f"{where}: field {name!r} must be {what}, got {rec[name]!r}")


def eps_key(eps: float) -> str:
    return f"{float(eps):.12g}"


def record_key(rec: dict) -> tuple:
    return (eps_key(rec["eps"]), int(rec["index"]))


def read_records(path: str) -> list[dict]:
    """All complete records of a JSONL file (a truncated last line is ignored)."""
    recs = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise VerikitError(f"cannot read {path}: {e.strerror}") from None
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if not data.endswith(b"\n") and line == data.rsplit(b"\n", 1)[-1]:
                break  # the half-written tail of an interrupted run
            raise VerikitError(f"{path}:{lineno}: not a JSON record; not a verikit results file?") from None
        check_record(rec, f"{path}:{lineno}")
        recs.append(rec)
    return recs


class RecordWriter:
    """Append-and-flush writer; `path=None` keeps records in memory only."""

    def __init__(self, path: Optional[str], resume: bool = False, model: Optional[str] = None):
        self.path = path
        self.records: list[dict] = []
        self._file = None
        self._mode = "w"
        self.done: set = set()
        if path is None:
            return
        if resume and os.path.exists(path):
            self.records = read_records(path)
            other = {r.get("model") for r in self.records} - {None, model}
            if model is not None and other:
                raise VerikitError(f"--resume: {path} holds results for another model ({', '.join(sorted(other))})")
            self._mode = "a"
        self.done = {record_key(r) for r in self.records}

    def _open(self) -> None:
        if self._mode == "a":
            self._truncate_partial_tail(self.path)
        self._file = open(self.path, self._mode, encoding="utf-8")
        self._mode = "a"  # (re)opened later: never truncate what this run wrote

    @staticmethod
    def _truncate_partial_tail(path: str) -> None:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def is_done(self, eps: float, index: int) -> bool:
        return self.path is not None and (eps_key(eps), int(index)) in self.done

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        if self.path is None:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps(rec, sort_keys=True) + "\n")
        self._file.flush()

    def write_all(self, recs: Iterable[dict]) -> None:
        for r in recs:
            self.write(r)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
