"""VNN-LIB 2.0 queries: typed network declarations, tensor-indexed variables, the same
assertion logic as 1.0 (plus == and !=).

A 2.0 file starts with (vnnlib-version <2.0>), then one or more
(declare-network NAME [(equal-to N) | (isomorphic-to N)] (declare-input V TYPE [d0,d1,..] ["onnx"])
 ... (declare-hidden ...) (declare-output ...)), then the assertions. `parse_query` reads every
construct of the grammar into a `Query` (several networks included); `compile_query` turns a
query with one network, one input and one output into the same `VnnlibProperty` that a 1.0
file gives (tensor elements flattened row-major, as ONNX stores them), so everything
downstream is shared. What the checker cannot answer (several networks, hidden nodes,
several inputs/outputs, integer element types, non-box input constraints) is refused in one
line naming the file and line.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import product
from typing import Optional

from verikit.errors import SpecError

from .vnnlib import VnnlibProperty, _add, _compile, _scale

# an s-expression token: parentheses, a bracketed index/shape, a quoted ONNX name, or an atom
_TOKEN2 = re.compile(r'\(|\)|\[[^\]]*\]|\[[^\]]*$|"[^"]*"?|[^\s()\[\]"]+')
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_VERSION = re.compile(r"^<(\d+)\.(\d+)>$")
# ONNX element types a real-valued property can speak about (integer/bool inputs are refused)
FLOAT_TYPES = {"Real", "float16", "float32", "float64", "bfloat16", "float", "double",
               "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz", "float4e2m1"}
ONNX_TYPES = FLOAT_TYPES | {"int4", "int8", "int16", "int32", "int64", "uint4", "uint8", "uint16", "uint32",
                            "uint64", "bool", "complex64", "complex128", "string"}


@dataclass
class Tok:
    text: str
    line: int


@dataclass
class SList:
    items: list
    line: int


@dataclass
class TensorDecl:
    kind: str  # input / hidden / output
    name: str
    element_type: str
    shape: tuple
    onnx_name: Optional[str]
    line: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class NetworkDecl:
    name: str
    line: int
    equivalence: list = field(default_factory=list)  # [(equal-to | isomorphic-to, other network name)]
    inputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


@dataclass
class Query:
    version: tuple
    networks: list
    assertions: list  # the raw (assert ...) s-expressions
    path: str


def is_vnnlib2(text: str) -> bool:
    """Does the text use the 2.0 syntax (a version header or a network declaration)?"""
    body = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    return re.search(r"\(\s*(vnnlib-version|declare-network)\b", body) is not None


def tokenize(text: str, path: str) -> list:
    toks = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0]
        for m in _TOKEN2.finditer(line):
            t = m.group(0)
            if t.startswith("[") and not t.endswith("]"):
                raise SpecError(f"{path}:{lineno}: '[' is not closed on its line")
            if t.startswith('"') and (len(t) < 2 or not t.endswith('"')):
                raise SpecError(f"{path}:{lineno}: unterminated string {t!r}")
            toks.append(Tok(t, lineno))
    return toks


def sexprs(toks: list, path: str) -> list:
    stack, top = [], []
    for t in toks:
        if t.text == "(":
            stack.append(SList([], t.line))
        elif t.text == ")":
            if not stack:
                raise SpecError(f"{path}:{t.line}: unbalanced ')'")
            done = stack.pop()
            (stack[-1].items if stack else top).append(done)
        elif not stack:
            raise SpecError(f"{path}:{t.line}: unexpected token {t.text!r} outside parentheses")
        else:
            stack[-1].items.append(t)
    if stack:
        raise SpecError(f"{path}:{stack[-1].line}: '(' opened here is never closed")
    return top


def _head(s) -> Optional[str]:
    return s.items[0].text if isinstance(s, SList) and s.items and isinstance(s.items[0], Tok) else None


def _ints(tok: Tok, path: str, what: str) -> tuple:
    inner = tok.text[1:-1].replace(",", " ").split()
    if not all(re.fullmatch(r"\d+", v) for v in inner):
        raise SpecError(f"{path}:{tok.line}: {what} must be non-negative integers, got {tok.text}")
    return tuple(int(v) for v in inner)


def _tensor_decl(s: SList, kind: str, path: str) -> TensorDecl:
    items = s.items[1:]
    usage = f'(declare-{kind} NAME TYPE [d0,d1,...] ' + ('"onnx-name")' if kind == "hidden" else '["onnx-name"])')
    if len(items) not in (3, 4) or not all(isinstance(i, Tok) for i in items):
        raise SpecError(f"{path}:{s.line}: expected {usage}")
    name, etype, shape = items[0], items[1], items[2]
    if not _NAME.match(name.text):
        raise SpecError(f"{path}:{name.line}: bad variable name {name.text!r} (a letter, then letters, digits, _)")
    if etype.text not in ONNX_TYPES:
        raise SpecError(f"{path}:{etype.line}: unknown element type {etype.text!r} (Real or an ONNX type such as float32)")
    if not shape.text.startswith("["):
        raise SpecError(f"{path}:{shape.line}: expected a tensor shape like [1,784], got {shape.text!r}")
    onnx = None
    if len(items) == 4:
        if not items[3].text.startswith('"'):
            raise SpecError(f"{path}:{items[3].line}: the ONNX name must be quoted, got {items[3].text!r}")
        onnx = items[3].text[1:-1]
    elif kind == "hidden":
        raise SpecError(f"{path}:{s.line}: declare-hidden needs the ONNX node name: {usage}")
    return TensorDecl(kind, name.text, etype.text, _ints(shape, path, "shape entries"), onnx, s.line)


_ORDER = {"input": 0, "hidden": 1, "output": 2}


def _network(s: SList, path: str, names: set) -> NetworkDecl:
    if len(s.items) < 2 or not isinstance(s.items[1], Tok) or not _NAME.match(s.items[1].text):
        raise SpecError(f"{path}:{s.line}: expected (declare-network NAME (declare-input ...) (declare-output ...))")
    net = NetworkDecl(s.items[1].text, s.line)
    last = -1
    for part in s.items[2:]:
        head = _head(part)
        if head in ("equal-to", "isomorphic-to"):
            if len(part.items) != 2 or not isinstance(part.items[1], Tok):
                raise SpecError(f"{path}:{part.line}: expected ({head} NETWORK)")
            if net.inputs or net.hidden or net.outputs:
                raise SpecError(f"{path}:{part.line}: ({head} ...) must come before the declarations")
            net.equivalence.append((head, part.items[1].text))
            continue
        kind = head[len("declare-"):] if head and head.startswith("declare-") else None
        if kind not in _ORDER:
            raise SpecError(f"{path}:{getattr(part, 'line', s.line)}: expected declare-input, declare-hidden or "
                            f"declare-output inside declare-network, got {head or part.text!r}")
        if _ORDER[kind] < last:
            raise SpecError(f"{path}:{part.line}: declare-{kind} after a later kind (order: inputs, hidden, outputs)")
        last = _ORDER[kind]
        decl = _tensor_decl(part, kind, path)
        if decl.name in names:
            raise SpecError(f"{path}:{decl.line}: variable {decl.name} declared twice (names are global)")
        names.add(decl.name)
        getattr(net, {"input": "inputs", "hidden": "hidden", "output": "outputs"}[kind]).append(decl)
    if not net.inputs or not net.outputs:
        raise SpecError(f"{path}:{s.line}: network {net.name} needs at least one declare-input and one declare-output")
    named = [d.onnx_name is not None for d in net.inputs + net.outputs]
    if any(named) and not all(named):
        raise SpecError(f"{path}:{s.line}: network {net.name}: give ONNX names to all of its inputs and outputs or to none")
    return net


def parse_query(text: str, path: str = "<vnnlib>") -> Query:
    """Every construct of the 2.0 grammar, checked for scoping (declared before use, unique
    names, known networks in equal-to/isomorphic-to, declarations before assertions)."""
    top = sexprs(tokenize(text, path), path)
    if not top or _head(top[0]) != "vnnlib-version":
        line = top[0].line if top else 1
        raise SpecError(f"{path}:{line}: a VNN-LIB 2.0 file starts with (vnnlib-version <2.0>)")
    vs = top[0]
    m = _VERSION.match(vs.items[1].text) if len(vs.items) == 2 and isinstance(vs.items[1], Tok) else None
    if not m:
        raise SpecError(f"{path}:{vs.line}: expected (vnnlib-version <MAJOR.MINOR>)")
    version = (int(m.group(1)), int(m.group(2)))
    if version[0] != 2:
        raise SpecError(f"{path}:{vs.line}: VNN-LIB version {version[0]}.{version[1]} is not supported (2.x is)")
    networks, assertions, names, net_names = [], [], set(), set()
    for s in top[1:]:
        head = _head(s)
        if head == "declare-network":
            if assertions:
                raise SpecError(f"{path}:{s.line}: network declarations must come before the assertions")
            net = _network(s, path, names)
            if net.name in net_names or net.name in names:
                raise SpecError(f"{path}:{s.line}: name {net.name} declared twice")
            for _, other in net.equivalence:
                if other not in net_names:
                    raise SpecError(f"{path}:{s.line}: network {net.name} refers to undeclared network {other}")
            net_names.add(net.name)
            networks.append(net)
        elif head == "assert":
            if len(s.items) != 2:
                raise SpecError(f"{path}:{s.line}: assert takes one formula")
            assertions.append(s.items[1])
        elif head in ("declare-const", "declare-fun"):
            raise SpecError(f"{path}:{s.line}: {head} is VNN-LIB 1.0 syntax; a 2.0 file declares networks")
        else:
            raise SpecError(f"{path}:{s.line}: expected declare-network or assert, got {head!r}")
    if not networks:
        raise SpecError(f"{path}: no declare-network")
    query = Query(version, networks, assertions, path)
    variables = {d.name: d for n in networks for d in n.inputs + n.hidden + n.outputs}
    for a in assertions:  # scoping and index checks for the whole query, several networks included
        _formula(a, path, lambda tok, idx: _element(variables, tok, idx, path))
    return query


def _element(variables: dict, tok: Tok, index: Optional[Tok], path: str):
    """(declaration, flat row-major index) of a variable reference."""
    decl = variables.get(tok.text)
    if decl is None:
        raise SpecError(f"{path}:{tok.line}: variable {tok.text} is not declared")
    idx = _ints(index, path, "indices") if index is not None else ()
    if len(idx) != len(decl.shape):
        raise SpecError(f"{path}:{tok.line}: {tok.text} has {len(decl.shape)} dimension(s) {list(decl.shape)}, "
                        f"indexed with {len(idx)}")
    flat = 0
    for i, n in zip(idx, decl.shape):
        if i >= n:
            raise SpecError(f"{path}:{tok.line}: index {list(idx)} out of range for {tok.text} of shape {list(decl.shape)}")
        flat = flat * n + i
    return decl, flat


def _terms(items: list, path: str, ref) -> list:
    """Split a list of arithmetic arguments (a name may be followed by its [index])."""
    out, k = [], 0
    while k < len(items):
        it = items[k]
        if isinstance(it, Tok) and it.text.startswith("["):
            raise SpecError(f"{path}:{it.line}: index {it.text} without a variable before it")
        nxt = items[k + 1] if k + 1 < len(items) else None
        if isinstance(it, Tok) and isinstance(nxt, Tok) and nxt.text.startswith("["):
            out.append(_arith(it, path, ref, nxt))
            k += 2
        else:
            out.append(_arith(it, path, ref))
            k += 1
    return out


def _arith(e, path: str, ref, index: Optional[Tok] = None) -> dict:
    if isinstance(e, Tok):
        if _NUMBER.match(e.text) and index is None:
            return {1: float(e.text)}
        if not _NAME.match(e.text):
            raise SpecError(f"{path}:{e.line}: expected a number or a variable, got {e.text!r}")
        decl, flat = ref(e, index)
        return {(decl.name, flat): 1.0}
    op = _head(e)
    if op not in ("+", "-", "*"):
        raise SpecError(f"{path}:{e.line}: unknown arithmetic operator {op!r} (+, -, * are supported)")
    args = _terms(e.items[1:], path, ref)
    if not args:
        raise SpecError(f"{path}:{e.line}: ({op}) needs arguments")
    if op == "+":
        return _add(*args)
    if op == "-":
        return _scale(args[0], -1.0) if len(args) == 1 else _add(args[0], *(_scale(a, -1.0) for a in args[1:]))
    consts = [a for a in args if set(a) <= {1}]
    others = [a for a in args if not set(a) <= {1}]
    if len(others) > 1:
        raise SpecError(f"{path}:{e.line}: product of variables is not linear (not supported)")
    c = math.prod(a.get(1, 0.0) for a in consts)
    return _scale(others[0], c) if others else {1: c}


def _formula(e, path: str, ref) -> list:
    """The formula in disjunctive normal form: a list of conjunctions of (expr, strict, line),
    meaning expr <= 0 (expr < 0 when strict)."""
    op = _head(e)
    if op in ("<=", ">=", "<", ">", "==", "=", "!="):
        args = _terms(e.items[1:], path, ref)
        if len(args) != 2:
            raise SpecError(f"{path}:{e.line}: {op} takes two arguments, got {len(args)}")
        a, b = args
        le, ge = _add(a, _scale(b, -1.0)), _add(b, _scale(a, -1.0))
        if op in ("==", "="):
            return [[(le, False, e.line), (ge, False, e.line)]]
        if op == "!=":
            return [[(le, True, e.line)], [(ge, True, e.line)]]
        return [[(le if op in ("<=", "<") else ge, op in ("<", ">"), e.line)]]
    if op == "and":
        parts = [_formula(a, path, ref) for a in e.items[1:]]
        out = [sum(combo, []) for combo in product(*parts)]
        if len(out) > 100000:
            raise SpecError(f"{path}:{e.line}: formula too large in disjunctive normal form")
        return out
    if op == "or":
        return [conj for a in e.items[1:] for conj in _formula(a, path, ref)]
    raise SpecError(f"{path}:{getattr(e, 'line', '?')}: unknown connective {op!r} "
                    "(and, or, <=, >=, <, >, ==, != are supported)")


def compile_query(query: Query) -> VnnlibProperty:
    """The query as a `VnnlibProperty` of its one network (inputs X, outputs Y, flattened)."""
    path = query.path
    if len(query.networks) != 1:
        extra = query.networks[1]
        raise SpecError(f"{path}:{extra.line}: a second network ({extra.name}) is not supported: verikit checks "
                        "properties of one network")
    (net,) = query.networks
    for decls, what in ((net.hidden, "declare-hidden (constraints on hidden nodes)"),
                        (net.inputs[1:], "a second declare-input"), (net.outputs[1:], "a second declare-output")):
        if decls:
            raise SpecError(f"{path}:{decls[0].line}: {what} is not supported")
    x, y = net.inputs[0], net.outputs[0]
    for d in (x, y):
        if d.element_type not in FLOAT_TYPES:
            raise SpecError(f"{path}:{d.line}: element type {d.element_type} of {d.name} is not supported "
                            "(real and floating-point types are)")
    role = {x.name: "X", y.name: "Y"}

    def ref(tok, index):
        return _element({x.name: x, y.name: y}, tok, index, path)

    dnf = [[]]
    for a in query.assertions:
        part = _formula(a, path, ref)
        dnf = [p + q for p in dnf for q in part]
        if len(dnf) > 100000:
            raise SpecError(f"{path}:{getattr(a, 'line', '?')}: property too large in disjunctive normal form")
    converted = []
    for conj in dnf:
        rows = []
        for expr, strict, line in conj:
            keys = [k for k in expr if k != 1 and expr[k] != 0]
            kinds = {role[k[0]] for k in keys}
            if kinds == {"X"} and len(keys) != 1:
                raise SpecError(f"{path}:{line}: input constraint on several elements of {x.name} is not supported "
                                "(input regions must be boxes)")
            if kinds == {"X", "Y"}:
                raise SpecError(f"{path}:{line}: a constraint mixing {x.name} and {y.name} is not supported")
            rows.append(({(role[k[0]], k[1]) if k != 1 else 1: v for k, v in expr.items()}, strict))
        converted.append(rows)
    prop = _compile(converted, x.size, y.size, path)
    prop.network = net
    return prop


def parse_vnnlib2(text: str, path: str = "<vnnlib>") -> VnnlibProperty:
    return compile_query(parse_query(text, path))


def check_binding(prop: VnnlibProperty, onnx_path: str, graph_input_shape: tuple, graph_output_shape: tuple) -> None:
    """The network declaration must fit the model it is bound to: element counts always, ONNX
    names where the query gives them, shapes up to dimensions of size 1."""
    net = getattr(prop, "network", None)
    if net is None:
        return
    x, y = net.inputs[0], net.outputs[0]
    for decl, shape in ((x, graph_input_shape), (y, graph_output_shape)):
        if _squeezed(decl.shape) != _squeezed(tuple(shape)):
            raise SpecError(f"{prop.path}:{decl.line}: {decl.name} is declared with shape {list(decl.shape)}, "
                            f"the model's {decl.kind} has shape {list(shape)}")
    if x.onnx_name is None:
        return
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = {"input": [i.name for i in graph.input if i.name not in inits], "output": [o.name for o in graph.output]}
    for decl in (x, y):
        if decl.onnx_name not in names[decl.kind]:
            raise SpecError(f"{prop.path}:{decl.line}: {decl.name} is bound to ONNX {decl.kind} {decl.onnx_name!r}, "
                            f"the model's {decl.kind}s are {', '.join(names[decl.kind])}")


def _squeezed(shape: tuple) -> tuple:
    return tuple(n for n in shape if n != 1)  # [1,784] and [784] name the same elements
