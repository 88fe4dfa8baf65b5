"""VNN-LIB 2.0: the grammar on hand-written files, every 1.0 file of the shared VNN-COMP 2021
benchmarks rewritten as 2.0 (the same Spec, exactly), one-line refusals with line numbers,
and the network binding checked against the model."""
import glob
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED, TEST_DATA
from verikit.certify.vnnlib import load_vnnlib, parse_vnnlib
from verikit.certify.vnnlib2 import compile_query, is_vnnlib2, parse_query
from verikit.cli import main
from verikit.errors import SpecError

VNN = os.path.join(SHARED, "vnncomp2021")
V1_FILES = sorted(glob.glob(os.path.join(VNN, "*", "*.vnnlib")))
# the MNIST files take ~2 s each (784 input bounds per disjunct): three in the default run, all when slow
_MNIST = [p for p in V1_FILES if "mnistfc" in p]
ROUND_TRIP = [pytest.param(p, marks=pytest.mark.slow) if p in _MNIST[3:] else p for p in V1_FILES]


def as_vnnlib2(text: str, rows_of: int = 1) -> str:
    """A 1.0 property rewritten in 2.0 syntax: one network, X as a [1, n] tensor, Y as [n]."""
    n_in = len(set(re.findall(r"\(declare-const X_(\d+) Real\)", text)))
    n_out = len(set(re.findall(r"\(declare-const Y_(\d+) Real\)", text)))
    body = re.sub(r"\(declare-const [XY]_\d+ Real\)", "", text)
    body = re.sub(r"\bX_(\d+)\b", r"X[0,\1]", body)
    body = re.sub(r"\bY_(\d+)\b", r"Y[\1]", body)
    head = (f"(vnnlib-version <2.0>)\n(declare-network net\n  (declare-input X Real [1,{n_in}])\n"
            f"  (declare-output Y float32 [{n_out}]))\n")
    return head + body


def assert_same_property(a, b):
    assert (a.num_inputs, a.num_outputs, len(a.cases)) == (b.num_inputs, b.num_outputs, len(b.cases))
    for ca, cb in zip(a.cases, b.cases):
        for f in ("lo", "hi", "inner_lo", "inner_hi"):
            assert np.array_equal(getattr(ca, f), getattr(cb, f)), f
        assert torch.equal(ca.spec.C, cb.spec.C) and torch.equal(ca.spec.d, cb.spec.d)
        assert ca.spec.group_list == cb.spec.group_list
        sa, sb = ca.spec.strict, cb.spec.strict
        assert (sa is None and sb is None) or torch.equal(sa, sb)


@pytest.mark.skipif(not V1_FILES, reason="shared VNN-COMP files not present")
@pytest.mark.parametrize("path", ROUND_TRIP, ids=lambda p: os.path.relpath(p, VNN))
def test_every_shared_1_0_file_rewritten_as_2_0_gives_the_same_spec(path):
    text = open(path).read()
    v2 = as_vnnlib2(text)
    assert is_vnnlib2(v2) and not is_vnnlib2(text)
    prop2 = parse_vnnlib(v2, "rewritten.vnnlib")
    assert_same_property(load_vnnlib(path), prop2)
    assert prop2.network.inputs[0].shape == (1, prop2.num_inputs)


BOX2 = """(vnnlib-version <2.0>)
; a comment line
(declare-network f
    (declare-input  X Real [2,3])   ; 6 inputs, row-major
    (declare-output Y Real [])
)
"""


def _box(lo=-1.0, hi=1.0):
    return "".join(f"(assert (>= X[{i},{j}] {lo}))\n(assert (<= X[{i}, {j}] {hi}))\n"
                   for i in range(2) for j in range(3))


def test_multi_dimensional_indices_are_row_major_and_a_scalar_output_needs_none():
    prop = parse_vnnlib(BOX2 + _box() + "(assert (<= X [1,2] 0.5))\n(assert (>= X[0,1] 0))\n(assert (> Y 3))\n")
    (case,) = prop.cases
    assert prop.num_inputs == 6 and prop.num_outputs == 1
    assert list(case.hi) == [1, 1, 1, 1, 1, 0.5] and list(case.lo) == [-1, 0, -1, -1, -1, -1]
    # unsafe: Y > 3, i.e. -Y < -3 (strict row)
    assert case.spec.C.tolist() == [[-1.0]] and case.spec.d.tolist() == [-3.0] and case.spec.strict.tolist() == [True]


def test_equal_and_not_equal():
    eq = parse_vnnlib(BOX2 + _box() + "(assert (== Y 2))\n")
    (case,) = eq.cases
    assert case.spec.group_list == [(0, 1)]  # Y <= 2 and Y >= 2 in one polytope
    assert case.spec.violated_by(torch.tensor([[2.0]], dtype=torch.float64)).tolist() == [True]
    assert case.spec.violated_by(torch.tensor([[2.5]], dtype=torch.float64)).tolist() == [False]
    ne = parse_vnnlib(BOX2 + _box() + "(assert (!= Y 2))\n")
    (case,) = ne.cases
    assert case.spec.group_list == [(0,), (1,)] and case.spec.strict.tolist() == [True, True]
    assert case.spec.violated_by(torch.tensor([[2.0]], dtype=torch.float64)).tolist() == [False]
    assert case.spec.violated_by(torch.tensor([[1.9]], dtype=torch.float64)).tolist() == [True]


def test_arithmetic_and_connectives():
    text = BOX2 + _box() + "(assert (or (and (<= (+ (* 2 Y) (- 1 3) (- Y)) 0.5)) (>= (- Y 1 2) 0)))\n"
    (case,) = parse_vnnlib(text).cases
    # (2Y - 2 - Y) <= 0.5  ->  Y <= 2.5 ; (Y - 1 - 2) >= 0  ->  -Y <= -3
    assert case.spec.C.tolist() == [[1.0], [-1.0]] and case.spec.d.tolist() == [2.5, -3.0]
    assert case.spec.group_list == [(0,), (1,)]


def test_several_networks_parse_and_the_checker_refuses_them_at_the_second():
    text = """(vnnlib-version <2.0>)
(declare-network teacher
  (declare-input tX Real [1,2] "input") (declare-output tY Real [1,2] "output"))
(declare-network student (isomorphic-to teacher)
  (declare-input sX Real [1,2]) (declare-output sY Real [1,2]))
(declare-network copy (equal-to teacher)
  (declare-input cX float32 [1,2]) (declare-hidden cH float32 [1,4] "relu_out") (declare-output cY float32 [1,2]))
(assert (<= tX[0,0] 1)) (assert (== tX[0,0] sX[0,0]))
(assert (> (- tY[0,1] sY[0,1]) cH[0,3]))
"""
    q = parse_query(text, "multi.vnnlib")
    assert [n.name for n in q.networks] == ["teacher", "student", "copy"]
    assert q.networks[0].inputs[0].onnx_name == "input" and q.networks[1].inputs[0].onnx_name is None
    assert q.networks[1].equivalence == [("isomorphic-to", "teacher")]
    assert q.networks[2].equivalence == [("equal-to", "teacher")]
    assert q.networks[2].hidden[0].shape == (1, 4) and q.networks[2].hidden[0].onnx_name == "relu_out"
    assert len(q.assertions) == 3 and q.version == (2, 0)
    with pytest.raises(SpecError, match=r"^multi.vnnlib:4: a second network \(student\) is not supported"):
        compile_query(q)


HEAD = "(vnnlib-version <2.0>)\n(declare-network n (declare-input X Real [2]) (declare-output Y Real [2]))\n"
OK_BOX = "(assert (<= X[0] 1)) (assert (>= X[0] 0)) (assert (<= X[1] 1)) (assert (>= X[1] 0))\n"

REFUSED = [  # (text, line, message fragment)
    ("(declare-network n (declare-input X Real [2]) (declare-output Y Real [2]))\n", 1, "starts with (vnnlib-version"),
    ("(vnnlib-version <3.0>)\n" + HEAD.splitlines()[1], 1, "version 3.0 is not supported"),
    (HEAD + "(assert (<= Z[0] 1))\n", 3, "Z is not declared"),
    (HEAD + "(assert (<= X[2] 1))\n", 3, "out of range"),
    (HEAD + "(assert (<= X[0,0] 1))\n", 3, "indexed with 2"),
    (HEAD + "(assert (<= X 1))\n", 3, "indexed with 0"),
    (HEAD + OK_BOX + "(assert (<= (* X[0] Y[1]) 1))\n", 4, "product of variables"),
    (HEAD + OK_BOX + "(assert (<= X[0] Y[1]))\n", 4, "mixing X and Y"),
    (HEAD + OK_BOX + "(assert (<= (+ X[0] X[1]) 1))\n", 4, "input regions must be boxes"),
    (HEAD + "(declare-const X_0 Real)\n", 3, "1.0 syntax"),
    (HEAD + "(assert (<= X[0] 1))\n(declare-network m (declare-input A Real [1]) (declare-output B Real [1]))\n", 4,
     "before the assertions"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X int8 [2])\n (declare-output Y Real [2]))\n"
     + OK_BOX, 3, "element type int8"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X Real [2])\n (declare-hidden H Real [2] \"h\")\n"
     " (declare-output Y Real [2]))\n" + OK_BOX, 4, "declare-hidden"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X Real [2])\n (declare-input W Real [2])\n"
     " (declare-output Y Real [2]))\n" + OK_BOX, 4, "a second declare-input"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-output Y Real [2])\n (declare-input X Real [2]))\n", 4,
     "order: inputs, hidden, outputs"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X Real [2] \"x\")\n (declare-output Y Real [2]))\n",
     2, "ONNX names to all"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X Real [2])\n (declare-output X Real [2]))\n", 4,
     "declared twice"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X Real [2)\n (declare-output Y Real [2]))\n", 3,
     "'[' is not closed"),
    ("(vnnlib-version <2.0>)\n(declare-network n\n (declare-input X Foo [2])\n (declare-output Y Real [2]))\n", 3,
     "unknown element type 'Foo'"),
    ("(vnnlib-version <2.0>)\n(declare-network n (equal-to m)\n (declare-input X Real [2])\n (declare-output Y Real [2]))\n",
     2, "undeclared network m"),
    (HEAD + "(assert (=> (<= X[0] 1) (<= Y[0] 1)))\n", 3, "unknown connective '=>'"),
    (HEAD + "(assert (<= (/ X[0] 2) 1))\n", 3, "unknown arithmetic operator '/'"),
    (HEAD + "(assert (<= [0] 1))\n", 3, "without a variable"),
]


@pytest.mark.parametrize("text,line,fragment", REFUSED, ids=[r[2] for r in REFUSED])
def test_unsupported_or_malformed_is_refused_in_one_line_with_its_line_number(text, line, fragment):
    with pytest.raises(SpecError) as e:
        parse_vnnlib(text, "q.vnnlib")
    msg = str(e.value)
    assert msg.startswith(f"q.vnnlib:{line}: ") and fragment in msg and "\n" not in msg


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(0, 2)), min_size=2, max_size=2),
       st.lists(st.lists(st.tuples(st.integers(0, 2), st.floats(-2, 2), st.sampled_from(["<=", ">=", "<", ">"]),
                                   st.floats(-5, 5)), min_size=1, max_size=3), min_size=1, max_size=3))
def test_random_properties_mean_the_same_in_both_versions(box, disjuncts):
    """A random box and a disjunction of conjunctions of output constraints, written in both syntaxes."""
    v1 = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + "".join(f"(declare-const Y_{j} Real)\n"
                                                                             for j in range(3))
    for i, (lo, w) in enumerate(box):
        v1 += f"(assert (>= X_{i} {lo!r}))\n(assert (<= X_{i} {lo + w!r}))\n"
    conj = ["(and " + " ".join(f"({op} (* {c!r} Y_{j}) {b!r})" for j, c, op, b in d) + ")" for d in disjuncts]
    v1 += "(assert (or " + " ".join(conj) + "))\n"
    assert_same_property(parse_vnnlib(v1), parse_vnnlib(as_vnnlib2(v1)))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


PROP_2_0 = """(vnnlib-version <2.0>)
(declare-network acas
  (declare-input X Real [1,1,1,5] "{inp}")
  (declare-output Y Real [1,5] "{out}"))
"""


def _acas_2_0(tmp_path, inp, out):
    onnx_path = os.path.join(TEST_DATA, "test_sat.onnx")
    v1 = open(os.path.join(TEST_DATA, "test_prop.vnnlib")).read()
    body = re.sub(r"\(declare-const [XY]_\d+ Real\)", "", v1)
    body = re.sub(r"\bX_(\d+)\b", r"X[0,0,0,\1]", re.sub(r"\bY_(\d+)\b", r"Y[0,\1]", body))
    p = tmp_path / "prop2.vnnlib"
    p.write_text(PROP_2_0.format(inp=inp, out=out) + body)
    return onnx_path, p


def _io_names(path):
    import onnx

    g = onnx.load(path).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits][0], g.output[0].name


def test_certify_answers_a_2_0_file_like_its_1_0_original(tmp_path):
    onnx_path, _ = _acas_2_0(tmp_path, "x", "y")
    inp, out = _io_names(onnx_path)
    onnx_path, p = _acas_2_0(tmp_path, inp, out)
    v1 = _cli("certify", onnx_path, "--vnnlib", os.path.join(TEST_DATA, "test_prop.vnnlib"), "--result-file",
              tmp_path / "r1.txt")
    v2 = _cli("certify", onnx_path, "--vnnlib", p, "--result-file", tmp_path / "r2.txt")
    assert v1.exit_code == 0 and v2.exit_code == 0, v2.output
    first = (tmp_path / "r2.txt").read_text().splitlines()[0]
    assert first == (tmp_path / "r1.txt").read_text().splitlines()[0] == "violated"


def test_binding_to_wrong_onnx_names_or_shapes_is_refused(tmp_path):
    onnx_path, p = _acas_2_0(tmp_path, "no_such_input", "y")
    res = _cli("certify", onnx_path, "--vnnlib", p)
    assert res.exit_code == 2 and "no_such_input" in res.stderr and "prop2.vnnlib:3:" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    inp, out = _io_names(onnx_path)
    text = p.read_text().replace('[1,1,1,5] "no_such_input"', f'[5,1] "{inp}"').replace('"y"', f'"{out}"')
    text = re.sub(r"X\[0,0,0,(\d)\]", r"X[\1,0]", text)
    p.write_text(text)
    res = _cli("certify", onnx_path, "--vnnlib", p)
    assert res.exit_code == 0, res.output  # [5,1] names the same five elements as [1,1,1,5]
    p.write_text(text.replace("[1,5]", "[5,5]").replace("Y[0,", "Y[1,"))
    res = _cli("certify", onnx_path, "--vnnlib", p)
    assert res.exit_code == 2 and "prop2.vnnlib:4:" in res.stderr and "shape" in res.stderr
