"""`verikit vnncomp`: run the instances of a VNN-COMP benchmark CSV, one result row per instance.

`decide_instance(instance, settings, models)` is the unit of work: one instance in, one results
row (and its VNN-COMP result text) out, never an exception for a problem of that instance alone
(an unsupported operator, a corrupt model, a malformed property, a failing domain, even an
unexpected crash such as running out of memory: an `error` row with the message in `note`).
`run_instance` also writes the result file. `ResultsCsv` appends and flushes each row as soon as
it is finished, so an interrupted or killed run keeps every finished instance, and with
`resume=True` it reads the rows back (cutting off a half-written last line) so that the run
skips the instances already done.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
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


def decide_instance(inst: dict, settings: VnncompSettings, models: dict) -> tuple[dict, str]:
    """Decide one instance: (its results row, a dict with COLUMNS; its VNN-COMP result text).
    `models` caches loaded models (or their load errors) by path across instances."""
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
    except Exception as e:  # a bug or out of memory in one instance must not end a long campaign
        res = VnnResult(ERROR, 0.0, note=crash_note(e))
    return instance_row(inst, res.answer, res.seconds, res.note), result_text(res)


def crash_note(exc: BaseException) -> str:
    """One line naming an unexpected exception (its type says more than its message)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def instance_row(inst: dict, answer: str, seconds: float, note: str) -> dict:
    expected = inst.get("expected", "")
    decided = answer in ("holds", "violated")
    agrees = str(answer == expected) if decided and expected in ("holds", "violated") else ""
    return {"benchmark": inst["benchmark"], "onnx": inst["onnx"], "vnnlib": inst["vnnlib"], "result": answer,
            "seconds": f"{seconds:.3f}", "expected": expected, "agrees": agrees, "note": note}


def write_result_file(inst: dict, settings: VnncompSettings, text: str) -> None:
    if settings.result_dir:
        with atomic_write(os.path.join(settings.result_dir, result_file_name(inst))) as f:
            f.write(text)


def run_instance(inst: dict, settings: VnncompSettings, models: dict) -> dict:
    """Decide one instance and write its result file (with `settings.result_dir`); its row."""
    row, text = decide_instance(inst, settings, models)
    write_result_file(inst, settings, text)
    return row


def instance_key(row: dict) -> tuple:
    return (row["benchmark"], row["onnx"], row["vnnlib"])


class ResultsCsv:
    """The results CSV, written row by row (appended and flushed): a killed run keeps its
    finished rows. With `resume=True` an existing file's rows are read back into `rows` (a
    half-written last line is cut off) and new rows are appended after them; `is_done(inst)`
    tells which instances they cover (an instance listed twice needs two rows)."""

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self.rows: list = []
        if resume and os.path.exists(path):
            self.rows = read_results(path)
        if resume and os.path.exists(path) and os.path.getsize(path) > 0:
            self._file = open(path, "a", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        else:
            self._file = open(path, "w", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._csv.writeheader()
            self._file.flush()
        self._left = Counter(instance_key(r) for r in self.rows)

    def is_done(self, inst: dict) -> bool:
        """True for as many occurrences of an instance as the file already holds rows for it."""
        key = instance_key(inst)
        if self._left[key] > 0:
            self._left[key] -= 1
            return True
        return False

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._csv.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_results(path: str) -> list:
    """The complete rows of a results CSV; a half-written last line (a killed run) is cut off
    the file. A file with other columns is bad input (and left as it is), not something to
    append to."""
    import io

    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    text = complete.decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is not None and reader.fieldnames != COLUMNS or (not complete and data):
        raise VerikitError(f"--resume: {path} is not a verikit vnncomp results file (its first line is not "
                           f"{','.join(COLUMNS)})")
    rows = []
    for n, r in enumerate(reader, 2):
        if None in r or any(v is None for v in r.values()):
            raise VerikitError(f"--resume: {path}:{n}: the row does not have the {len(COLUMNS)} columns")
        rows.append(r)
    if len(complete) < len(data):
        with open(path, "rb+") as f:
            f.truncate(len(complete))
    return rows


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
