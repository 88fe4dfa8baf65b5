import glob
import os

import numpy as np
import pytest
import torch

from conftest import SHARED
from verikit.certify.vnnlib import load_vnnlib, parse_vnnlib
from verikit.errors import SpecError

VNN = os.path.join(SHARED, "vnncomp2021")
HEADER = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 2))\n"


def _violated(prop, x, y):
    """Reference semantics: is (x, y) in the unsafe region of some case?"""
    for case in prop.cases:
        if np.all(x >= case.lo) and np.all(x <= case.hi):
            if bool(case.spec.violated_by(torch.tensor(y, dtype=torch.float64)[None])[0]):
                return True
    return False


@pytest.mark.skipif(not os.path.isdir(VNN), reason="shared VNN-COMP files not present")
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(VNN, "*", "*.vnnlib"))), ids=os.path.basename)
def test_shared_vnncomp_files_parse(path):
    prop = load_vnnlib(path)
    assert prop.cases and prop.num_inputs > 0 and prop.num_outputs > 0
    for case in prop.cases:
        assert case.lo.shape == (prop.num_inputs,) and np.all(case.lo <= case.hi)
        assert case.spec.num_outputs == prop.num_outputs


def test_mnist_property_matches_its_text():
    path = os.path.join(VNN, "mnistfc", "prop_0_0.03.vnnlib")
    if not os.path.exists(path):
        pytest.skip("shared files missing")
    prop = load_vnnlib(path)
    (case,) = prop.cases
    assert prop.num_inputs == 784 and prop.num_outputs == 10
    # robustness: unsafe iff some other class scores at least the true one -> 9 single-row groups
    assert len(case.spec.group_list) == 9 and all(len(g) == 1 for g in case.spec.group_list)
    width = case.hi - case.lo  # an L-inf ball of radius 0.03 clipped to [0, 1]
    assert width.max() == pytest.approx(0.06, abs=1e-6) and case.lo.min() >= 0 and case.hi.max() <= 1


def test_conjunction_of_output_constraints_is_one_polytope():
    prop = parse_vnnlib(HEADER + BOX + "(assert (<= Y_0 1))\n(assert (>= Y_1 3))\n")
    (case,) = prop.cases
    assert case.spec.group_list == [(0, 1)]  # both rows in one group: unsafe needs both
    x = np.array([0.0, 1.0])
    assert _violated(prop, x, [1.0, 3.0])  # boundary counts as unsafe (non-strict)
    assert _violated(prop, x, [0.0, 5.0])
    assert not _violated(prop, x, [1.5, 5.0])
    assert not _violated(prop, x, [0.0, 2.9])


def test_disjunction_of_output_constraints_is_several_polytopes():
    prop = parse_vnnlib(HEADER + BOX + "(assert (or (and (<= Y_0 1) (>= Y_1 3)) (<= Y_0 -5)))\n")
    (case,) = prop.cases
    assert len(case.spec.group_list) == 2
    x = np.array([0.5, 0.5])
    assert _violated(prop, x, [-6.0, 0.0])  # second disjunct alone
    assert _violated(prop, x, [1.0, 3.0])  # first disjunct alone
    assert not _violated(prop, x, [0.0, 0.0])  # neither


def test_disjunction_over_inputs_gives_separate_boxes():
    text = HEADER + "(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))" \
                    "            (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1))))\n(assert (<= Y_0 Y_1))\n"
    prop = parse_vnnlib(text)
    boxes = sorted((tuple(c.lo), tuple(c.hi)) for c in prop.cases)
    assert boxes == [((0.0, 0.0), (1.0, 1.0)), ((2.0, 0.0), (3.0, 1.0))]
    assert _violated(prop, np.array([2.5, 0.5]), [1.0, 2.0])
    assert not _violated(prop, np.array([1.5, 0.5]), [1.0, 2.0])  # between the boxes: not in the region


def test_linear_terms_with_constants():
    prop = parse_vnnlib(HEADER + BOX + "(assert (<= (+ (* 2 Y_0) (- Y_1) 1) 0))\n")
    (case,) = prop.cases
    x = np.zeros(2) + 0.5
    x[0] = 0.0
    assert _violated(prop, x, [1.0, 3.0])  # 2 - 3 + 1 = 0 <= 0
    assert not _violated(prop, x, [1.0, 2.9])


@pytest.mark.parametrize("text,line,what", [
    (HEADER + "(assert (<= X_0 1)\n", 5, "never closed"),
    (HEADER + "(assert (<= X_0 1)))\n", 5, "unbalanced"),
    (HEADER + BOX + "(assert (<= Y_0 Y_1 Y_0))\n", 9, "two arguments"),
    (HEADER + BOX + "(assert (xor (<= Y_0 1) (<= Y_1 1)))\n", 9, "unknown connective"),
    (HEADER + BOX + "(assert (<= (* Y_0 Y_1) 1))\n", 9, "not linear"),
    (HEADER + BOX + "(assert (<= Y_2 1))\n", 9, "before declare-const"),
    (HEADER + "(declare-const Z_0 Real)\n", 5, "X_i or Y_j"),
    (HEADER + "(declare-const X_2 Int)\n", 5, "Real"),
    (HEADER + BOX + "(check-sat)\n", 9, "declare-const or assert"),
    (HEADER + BOX + "(assert (<= Y_0 one))\n", 9, "'one'"),
])
def test_malformed_files_report_the_line(text, line, what):
    with pytest.raises(SpecError) as err:
        parse_vnnlib(text, "p.vnnlib")
    assert f"p.vnnlib:{line}:" in str(err.value) and what in str(err.value)


def test_unbounded_input_is_an_error():
    with pytest.raises(SpecError, match="X_1"):
        parse_vnnlib(HEADER + "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (<= Y_0 1))\n")


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_vnnlib(tmp_path / "nope.vnnlib")
    bad = tmp_path / "bin.vnnlib"
    bad.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SpecError, match="not a text file"):
        load_vnnlib(bad)
