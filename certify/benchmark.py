"""`verikit vnncomp`: run the instances of a VNN-COMP benchmark CSV, one result row per instance.

`run_instance(instance, settings, models)` is the unit of work: one instance in, one results
row out, never an exception for a problem of that instance alone (an unsupported operator, a
corrupt model, a malformed property, a failing domain: an `error` row with the message in
`note`). `ResultsCsv` writes each row as soon as it is finished, so an interrupted or killed
run keeps every finished instance.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from verikit.errors import VerikitError
from verikit.outputs import atomic_write

COLUMNS = ["benchmark", "onnx", "vnnlib", "result", "seconds", "expected", "agrees", "note"]
ERROR = "error"
# accepted words in the `expected` column -> verikit's answer (VNN-COMP 2022+ uses sat/unsat)
EXPECTED_WORDS = {"holds": "holds", "unsat": "holds", "violated": "violated", "sat": "violated",
                  "unknown": "unknown", "": ""}


@dataclass
class VnncompSettings:
    chain: "object"  # ChainConfig template: its timeout and model fields are set per instance
    device: str = "cpu"
    timeout: Optional[float] = None  # --timeout: overrides every instance's own timeout
    max_timeout: Optional[float] = None  # --max-timeout: caps it
    result_dir: Optional[str] = None


def normalise_expected(rows: list, path: str) -> list:
    """The `expected` column in verikit's words; an unknown word is bad input (file:row)."""
    for n, inst in enumerate(rows, 1):
        word = str(inst.get("expected", "")).strip().lower()
        if word not in EXPECTED_WORDS:
            raise VerikitError(f"{path}: instance {n} ({inst['onnx']}, {inst['vnnlib']}): bad expected value "
                               f"{inst['expected']!r}; use holds, violated, sat, unsat, unknown or leave it empty")
        inst["expected"] = EXPECTED_WORDS[word]
    return rows


def instance_timeout(inst: dict, settings: VnncompSettings) -> Optional[float]:
    limit = settings.timeout if settings.timeout is not None else inst["timeout"]
    if settings.max_timeout is not None:
        limit = min(limit, settings.max_timeout) if limit is not None else settings.max_timeout
    return limit


def result_file_name(inst: dict) -> str:
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    return f"{inst['benchmark'] + '_' if inst['benchmark'] else ''}{stem(inst['onnx'])}_{stem(inst['vnnlib'])}.txt"


def run_instance(inst: dict, settings: VnncompSettings, models: dict) -> dict:
    """Decide one instance; returns its results row (a dict with COLUMNS). `models` caches
    loaded models (or their load errors) by path across instances."""
    from .model import load_model
    from .vnn import VnnResult, check_property, result_text
    from .vnnlib import load_vnnlib

    try:
        path = inst["onnx_path"]
        if path not in models:
            try:
                models[path] = load_model(path, device=settings.device)
            except VerikitError as e:
                models[path] = e  # every instance of a broken model gets the same error row
        loaded = models[path]
        if isinstance(loaded, VerikitError):
            raise loaded
        cfg = dataclasses.replace(settings.chain, timeout=instance_timeout(inst, settings), onnx_path=loaded.path,
                                  onnx_input=loaded.onnx_input)
        res = check_property(loaded, load_vnnlib(inst["vnnlib_path"]), cfg)
    except VerikitError as e:
        res = VnnResult(ERROR, 0.0, note=" ".join(str(e).split()))
    expected = inst.get("expected", "")
    decided = res.answer in ("holds", "violated")
    agrees = str(res.answer == expected) if decided and expected in ("holds", "violated") else ""
    if settings.result_dir:
        with atomic_write(os.path.join(settings.result_dir, result_file_name(inst))) as f:
            f.write(result_text(res))
    return {"benchmark": inst["benchmark"], "onnx": inst["onnx"], "vnnlib": inst["vnnlib"], "result": res.answer,
            "seconds": f"{res.seconds:.3f}", "expected": expected, "agrees": agrees, "note": res.note}


class ResultsCsv:
    """The results CSV, written row by row (flushed): a killed run keeps its finished rows."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list = []
        self._file = open(path, "w", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._csv.writeheader()
        self._file.flush()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._csv.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def summary_line(rows: list, total: int, have_expected: bool) -> str:
    from verikit.progress import plural

    count = lambda a: sum(1 for r in rows if r["result"] == a)
    checked = sum(1 for r in rows if r["agrees"] in ("True", "False"))
    agree = sum(1 for r in rows if r["agrees"] == "True")
    done = f"{len(rows)} of {total} instances" if len(rows) < total else plural(len(rows), "instance")
    check = (f"{agree} of {plural(checked, 'answer')} checked against expected agree" if have_expected
             else "no expected answers to check against")
    return (f"{done}: {count('holds')} holds, {count('violated')} violated, {count('unknown')} unknown, "
            f"{plural(count(ERROR), 'error')}; {check}; total {sum(float(r['seconds']) for r in rows):.1f} s")
