"""VNN-LIB 1.0 properties (2.0 files are dispatched to vnnlib2.py) (the VNN-COMP format) compiled to input boxes and `Spec`s.

The assertions of a VNN-LIB file describe the *unsafe* region: an input X and output Y that
satisfy all of them is a counterexample. We bring the assertions into disjunctive normal
form; each disjunct is an input box (bounds on the X_i) and an output polytope {A y <= b}.
Disjuncts with the same input box share one `VnnlibCase`, whose `Spec` has one group per
polytope (the property holds on that box iff every polytope is unreachable, i.e. every group
has a row a_i y > b_i everywhere). The property holds iff it holds for every case.

Supported: declare-const (Real), assert, and/or, <=, >=, <, >, linear terms with +, -, * by
constants. The property is kept as written (float64 coefficients and thresholds): proofs are
about the closed region (a strict `<` proven as `<=` only enlarges the unsafe region), while a
counterexample must satisfy strict comparisons strictly (`Spec.strict`, and the inward input
bounds `lo_in`/`hi_in`). An input bound c * X_i <= b with c != 1 is rounded outward for the
proof box and inward for counterexamples (exact rational arithmetic).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from itertools import product
from typing import Optional, Union

import numpy as np
import torch

from verikit.errors import SpecError
from verikit.spec import Spec

_TOKEN = re.compile(r"\(|\)|[^\s()]+")


@dataclass
class _Tok:
    text: str
    line: int


@dataclass
class _List:
    items: list
    line: int


@dataclass
class VnnlibCase:
    """One input box with the output polytopes that must be unreachable from it."""

    lo: np.ndarray  # (num_inputs,) the closed box containing the input region (for proofs)
    hi: np.ndarray
    spec: Spec  # C: (m, num_outputs), d: (m,), one group per unsafe polytope; strict rows marked
    # float64 bounds such that every point of [lo_in, hi_in] satisfies the input constraints as
    # written, strict ones strictly (for counterexamples); None: the same as lo / hi
    lo_in: Optional[np.ndarray] = None
    hi_in: Optional[np.ndarray] = None

    @property
    def inner_lo(self) -> np.ndarray:
        return self.lo if self.lo_in is None else self.lo_in

    @property
    def inner_hi(self) -> np.ndarray:
        return self.hi if self.hi_in is None else self.hi_in

    def contains(self, x: np.ndarray) -> bool:
        """Does the (flat, float64) input x satisfy the case's input constraints as written?"""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return bool(np.all(x >= self.inner_lo) and np.all(x <= self.inner_hi))


@dataclass
class VnnlibProperty:
    cases: list
    num_inputs: int
    num_outputs: int
    path: str = ""
    network: Optional[object] = None  # VNN-LIB 2.0: the network declaration (vnnlib2.NetworkDecl) it binds to


def _tokenize(text: str, path: str) -> list[_Tok]:
    toks = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0]
        toks.extend(_Tok(m.group(0), lineno) for m in _TOKEN.finditer(line))
    return toks


def _parse_sexprs(toks: list[_Tok], path: str) -> list[_List]:
    stack: list[_List] = []
    top: list = []
    for t in toks:
        if t.text == "(":
            stack.append(_List([], t.line))
        elif t.text == ")":
            if not stack:
                raise SpecError(f"{path}:{t.line}: unbalanced ')'")
            done = stack.pop()
            (stack[-1].items if stack else top).append(done)
        else:
            if not stack:
                raise SpecError(f"{path}:{t.line}: unexpected token {t.text!r} outside parentheses")
            stack[-1].items.append(t)
    if stack:
        raise SpecError(f"{path}:{stack[-1].line}: '(' opened here is never closed")
    return top


_VAR = re.compile(r"^([XY])_(\d+)$")
Linear = dict  # var key ('X', i) / ('Y', j) / 1 (constant) -> coefficient


def _term(e, path: str, declared: set) -> Linear:
    if isinstance(e, _Tok):
        m = _VAR.match(e.text)
        if m:
            if e.text not in declared:
                raise SpecError(f"{path}:{e.line}: variable {e.text} used before declare-const")
            return {(m.group(1), int(m.group(2))): 1.0}
        try:
            return {1: float(e.text)}
        except ValueError:
            raise SpecError(f"{path}:{e.line}: expected a number or X_i/Y_j, got {e.text!r}") from None
    if not e.items or not isinstance(e.items[0], _Tok):
        raise SpecError(f"{path}:{e.line}: malformed term")
    op, args = e.items[0].text, [_term(a, path, declared) for a in e.items[1:]]
    if op == "+":
        return _add(*args)
    if op == "-":
        if len(args) == 1:
            return _scale(args[0], -1.0)
        return _add(args[0], *(_scale(a, -1.0) for a in args[1:]))
    if op == "*":
        consts = [a for a in args if set(a) <= {1}]
        others = [a for a in args if not set(a) <= {1}]
        if len(others) > 1:
            raise SpecError(f"{path}:{e.line}: product of variables is not linear")
        c = float(np.prod([a.get(1, 0.0) for a in consts]))
        return _scale(others[0], c) if others else {1: c}
    raise SpecError(f"{path}:{e.line}: unknown operator {op!r} in term")


def _add(*ts: Linear) -> Linear:
    out: Linear = {}
    for t in ts:
        for k, v in t.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _scale(t: Linear, c: float) -> Linear:
    return {k: c * v for k, v in t.items()}


Constraint = tuple  # (expression, strict): expression <= 0, or < 0 when strict
Formula = list  # DNF: list of conjunctions (lists of constraints)


def _formula(e, path: str, declared: set) -> Formula:
    if not isinstance(e, _List) or not e.items or not isinstance(e.items[0], _Tok):
        raise SpecError(f"{path}:{getattr(e, 'line', '?')}: expected a formula like (<= X_0 1)")
    op, args = e.items[0].text, e.items[1:]
    if op in ("<=", ">=", "<", ">"):
        if len(args) != 2:
            raise SpecError(f"{path}:{e.line}: {op} takes two arguments, got {len(args)}")
        a, b = _term(args[0], path, declared), _term(args[1], path, declared)
        expr = _add(a, _scale(b, -1.0)) if op in ("<=", "<") else _add(b, _scale(a, -1.0))
        return [[(expr, op in ("<", ">"))]]
    if op == "and":
        parts = [_formula(a, path, declared) for a in args]
        out = [sum(combo, []) for combo in product(*parts)]
        if len(out) > 100000:
            raise SpecError(f"{path}:{e.line}: formula too large in disjunctive normal form")
        return out
    if op == "or":
        return [conj for a in args for conj in _formula(a, path, declared)]
    raise SpecError(f"{path}:{e.line}: unknown connective {op!r} (expected and, or, <=, >=)")


def parse_vnnlib(text: str, path: str = "<vnnlib>") -> VnnlibProperty:
    from .vnnlib2 import is_vnnlib2, parse_vnnlib2

    if is_vnnlib2(text):  # 2.0 syntax: typed network declarations (certify/vnnlib2.py)
        return parse_vnnlib2(text, path)
    declared: set = set()
    xs, ys = set(), set()
    conjuncts: list[Formula] = []
    for s in _parse_sexprs(_tokenize(text, path), path):
        head = s.items[0].text if s.items and isinstance(s.items[0], _Tok) else None
        if head == "declare-const":
            if len(s.items) != 3 or not isinstance(s.items[1], _Tok):
                raise SpecError(f"{path}:{s.line}: expected (declare-const NAME Real)")
            name = s.items[1].text
            m = _VAR.match(name)
            if not m:
                raise SpecError(f"{path}:{s.line}: variable names must be X_i or Y_j, got {name!r}")
            if not isinstance(s.items[2], _Tok) or s.items[2].text != "Real":
                raise SpecError(f"{path}:{s.line}: only Real variables are supported")
            declared.add(name)
            (xs if m.group(1) == "X" else ys).add(int(m.group(2)))
        elif head == "assert":
            if len(s.items) != 2:
                raise SpecError(f"{path}:{s.line}: assert takes one formula")
            conjuncts.append(_formula(s.items[1], path, declared))
        else:
            raise SpecError(f"{path}:{s.line}: expected declare-const or assert, got {head!r}")
    if not xs or not ys:
        raise SpecError(f"{path}: no X_i or no Y_j declared")
    n_in, n_out = max(xs) + 1, max(ys) + 1
    if len(xs) != n_in or len(ys) != n_out:
        raise SpecError(f"{path}: X_i / Y_j must be numbered 0..n-1 without gaps")
    dnf: Formula = [[]]
    for f in conjuncts:
        dnf = [a + b for a in dnf for b in f]
        if len(dnf) > 100000:
            raise SpecError(f"{path}: property too large in disjunctive normal form")
    return _compile(dnf, n_in, n_out, path)


def _up(f: Fraction) -> float:
    """The smallest float64 >= f."""
    v = float(f)
    return v if Fraction(v) >= f else math.nextafter(v, math.inf)


def _down(f: Fraction) -> float:
    v = float(f)
    return v if Fraction(v) <= f else math.nextafter(v, -math.inf)


def _input_bound(c: dict, strict: bool, path: str) -> tuple:
    """An input constraint c_k x_i + c_0 <= 0 (< 0 when strict) as (i, is an upper bound, the
    bound rounded outward, the bound rounded inward), exactly (in fractions)."""
    var = [k for k in c if k != 1 and c[k] != 0]
    if len(var) != 1:
        raise SpecError(f"{path}: input constraints must bound one X_i each (boxes only)")
    (k,) = var
    bound = -Fraction(c.get(1, 0.0)) / Fraction(c[k])  # exact: c_k x + c_0 <= 0
    if c[k] > 0:  # x <= bound (x < bound when strict)
        inner = _down(bound)
        inner = math.nextafter(inner, -math.inf) if strict and Fraction(inner) == bound else inner
        return k[1], True, _up(bound), inner
    inner = _up(bound)
    inner = math.nextafter(inner, math.inf) if strict and Fraction(inner) == bound else inner
    return k[1], False, _down(bound), inner


def _compile(dnf: Formula, n_in: int, n_out: int, path: str) -> VnnlibProperty:
    by_box: dict = {}
    # the disjunctive normal form repeats the input box in every disjunct (a robustness
    # property: 1,568 input constraints in each of 9): each constraint is converted once
    converted: dict = {}
    for conj in dnf:
        lo, hi = np.full(n_in, -np.inf), np.full(n_in, np.inf)
        lo_in, hi_in = lo.copy(), hi.copy()
        rows = []
        for c, strict in conj:
            kinds = {k[0] for k in c if k != 1 and c[k] != 0}
            if kinds == {"X"}:
                key = (id(c), strict)
                if key not in converted:
                    converted[key] = (c, _input_bound(c, strict, path))  # c kept: its id stays unique
                i, upper, outer, inner = converted[key][1]
                if upper:
                    hi[i], hi_in[i] = min(hi[i], outer), min(hi_in[i], inner)
                else:
                    lo[i], lo_in[i] = max(lo[i], outer), max(lo_in[i], inner)
            elif kinds == {"Y"}:
                a = np.zeros(n_out)
                for k, v in c.items():
                    if k != 1:
                        a[k[1]] += v
                rows.append((a, -c.get(1, 0.0), strict))  # a.y <= b (a.y < b when strict)
            elif kinds == set():
                const = c.get(1, 0.0)
                if const > 0 or (strict and const == 0):  # 'k <= 0' (or 'k < 0') is false: disjunct is empty
                    rows = None
                    break
            else:
                raise SpecError(f"{path}: constraints mixing X and Y are not supported")
        if rows is None:
            continue
        if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)):
            missing = [i for i in range(n_in) if not (np.isfinite(lo[i]) and np.isfinite(hi[i]))]
            raise SpecError(f"{path}: inputs without lower and upper bound: {', '.join(f'X_{i}' for i in missing[:10])}")
        if np.any(lo > hi):
            continue  # empty input region: nothing to check
        if not rows:  # no output condition: every input of the box is unsafe
            rows = [(np.zeros(n_out), 0.0, False)]
        key = (lo.tobytes(), hi.tobytes(), lo_in.tobytes(), hi_in.tobytes())
        by_box.setdefault(key, (lo, hi, lo_in, hi_in, []))[4].append(rows)
    cases = []
    for lo, hi, lo_in, hi_in, polytopes in by_box.values():
        C, d, strict, groups = [], [], [], []
        for poly in polytopes:
            groups.append(tuple(range(len(C), len(C) + len(poly))))
            for a, b, st in poly:
                C.append(a)
                d.append(b)
                strict.append(st)
        spec = Spec(torch.tensor(np.array(C)), torch.tensor(np.array(d)), tuple(groups),
                    strict=torch.tensor(strict) if any(strict) else None)
        same = np.array_equal(lo, lo_in) and np.array_equal(hi, hi_in)
        cases.append(VnnlibCase(lo, hi, spec, None if same else lo_in, None if same else hi_in))
    return VnnlibProperty(cases, n_in, n_out, path)


def load_vnnlib(path: Union[str, "os.PathLike"]) -> VnnlibProperty:
    import os

    if not os.path.exists(path):
        raise SpecError(f"VNN-LIB file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file") from None
    return parse_vnnlib(text, str(path))
