"""Per-sample result records, streamed to a JSON-lines file.

Each finished sample is appended as one line and flushed at once, so an interrupted run keeps
everything finished so far. With `resume=True` the records already in the file are read back
(a half-written last line from a killed run is cut off) and their (eps, index) pairs skipped.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from verikit.errors import VerikitError


def eps_key(eps: float) -> str:
    return f"{float(eps):.12g}"


def record_key(rec: dict) -> tuple:
    return (eps_key(rec["eps"]), int(rec["index"]))


def read_records(path: str) -> list[dict]:
    """All complete records of a JSONL file (a truncated last line is ignored)."""
    recs = []
    with open(path, "rb") as f:
        data = f.read()
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if not data.endswith(b"\n") and line == data.rsplit(b"\n", 1)[-1]:
                break  # the half-written tail of an interrupted run
            raise VerikitError(f"{path}:{lineno}: not a JSON record; not a verikit results file?") from None
        if not isinstance(rec, dict) or "eps" not in rec or "index" not in rec:
            raise VerikitError(f"{path}:{lineno}: not a verikit result record")
        recs.append(rec)
    return recs


class RecordWriter:
    """Append-and-flush writer; `path=None` keeps records in memory only."""

    def __init__(self, path: Optional[str], resume: bool = False, model: Optional[str] = None):
        self.path = path
        self.records: list[dict] = []
        self._file = None
        self.done: set = set()
        if path is None:
            return
        if resume and os.path.exists(path):
            self.records = read_records(path)
            other = {r.get("model") for r in self.records} - {None, model}
            if model is not None and other:
                raise VerikitError(f"--resume: {path} holds results for another model ({', '.join(sorted(other))})")
            self._truncate_partial_tail(path)
            self._file = open(path, "a", encoding="utf-8")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")
        self.done = {record_key(r) for r in self.records}

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
        if self._file is not None:
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
