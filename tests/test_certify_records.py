"""JSONL streaming, resume, and the summary computed from records."""
import json

import pytest

from verikit.certify.records import RecordWriter, read_records
from verikit.certify.report import format_summary, format_sweep, summarize
from verikit.errors import VerikitError


def _rec(i, eps, status, by=None, t=0.5):
    return {"index": i, "eps": eps, "status": status, "by": by, "label": 0, "prediction": 0, "margin": None,
            "time": t, "times": {by: t} if by else {}, "note": "", "model": "m.onnx"}


def test_resume_cuts_a_half_written_line_and_skips_what_is_done(tmp_path):
    path = tmp_path / "r.jsonl"
    with RecordWriter(str(path), model="m.onnx") as w:
        w.write(_rec(0, 0.1, "verified", "box"))
        w.write(_rec(1, 0.1, "unknown"))
    with open(path, "a") as f:
        f.write('{"index": 2, "eps": 0.1, "sta')  # killed mid-write
    assert len(read_records(str(path))) == 2
    with RecordWriter(str(path), resume=True, model="m.onnx") as w:
        assert w.is_done(0.1, 0) and w.is_done(0.1, 1) and not w.is_done(0.1, 2) and not w.is_done(0.2, 0)
        w.write(_rec(2, 0.1, "falsified", "attack"))
    lines = path.read_text().splitlines()
    assert [json.loads(l)["index"] for l in lines] == [0, 1, 2]


def test_resume_refuses_another_models_results_and_non_records(tmp_path):
    path = tmp_path / "r.jsonl"
    with RecordWriter(str(path), model="a.onnx") as w:
        w.write({**_rec(0, 0.1, "unknown"), "model": "a.onnx"})
    with pytest.raises(VerikitError, match="another model"):
        RecordWriter(str(path), resume=True, model="b.onnx")
    path.write_text(json.dumps(_rec(0, 0.1, "unknown")) + '\nnot json\n' + json.dumps(_rec(1, 0.1, "unknown")) + "\n")
    with pytest.raises(VerikitError, match=":2:"):
        read_records(str(path))


def test_without_resume_the_file_starts_fresh(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_rec(5, 0.1, "unknown")) + "\n")
    with RecordWriter(str(path)) as w:
        assert not w.is_done(0.1, 5)
        w.write(_rec(0, 0.1, "unknown"))
    assert [r["index"] for r in read_records(str(path))] == [0]


def test_summary_counts_each_stage():
    recs = [_rec(0, 0.1, "verified", "box"), _rec(1, 0.1, "verified", "crown"), _rec(2, 0.1, "verified", "crown"),
            _rec(3, 0.1, "falsified", "attack"), _rec(4, 0.1, "falsified", "milp"), _rec(5, 0.1, "unknown"),
            _rec(6, 0.1, "misclassified"), _rec(0, 0.2, "unknown"), _rec(1, 0.2, "misclassified")]
    s1, s2 = summarize(recs, ["attack", "box", "crown", "milp"])
    assert (s1["samples"], s1["verified"], s1["falsified"], s1["unknown"], s1["misclassified"]) == (7, 3, 2, 1, 1)
    assert s1["certified_accuracy"] == pytest.approx(3 / 7) and s1["clean_accuracy"] == pytest.approx(6 / 7)
    rows = {r["stage"]: r for r in s1["stages"]}
    assert [rows[s]["verified"] for s in ("attack", "box", "crown", "milp")] == [0, 1, 2, 0]
    assert [rows[s]["falsified"] for s in ("attack", "box", "crown", "milp")] == [1, 0, 0, 1]
    assert rows["crown"]["certified_accuracy"] == pytest.approx(3 / 7)
    assert rows["crown"]["seconds"] == pytest.approx(1.0)
    assert s2["samples"] == 2 and s2["certified_accuracy"] == 0
    text = format_summary([s1, s2])
    assert "certified accuracy: 42.9%" in text and "misclassified: 1" in text
    sweep = format_sweep([s1, s2]).splitlines()
    assert len(sweep) == 4 and sweep[2].split()[0] == "0.1" and "42.9%" in sweep[2]
