"""Import a PyTorch module (nn.Sequential or anything torch.fx can trace) into the IR.

Ops keep *references* to the module's live parameters (no copies), so bounds computed on the
graph are differentiable with respect to the module: this is what certified training uses.
BatchNorm modules become `ir.BatchNorm` ops that read the module's running statistics, or the
batch statistics when evaluated with `EvalContext(bn_mode="batch")`.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ir
from .errors import UnsupportedOpsError, VerikitError


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _module_op(m: nn.Module):
    """The IR op for a leaf module, or None if it is an identity at inference."""
    if isinstance(m, nn.Linear):
        return ir.Linear(m.weight, m.bias)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"padding={m.padding!r}, padding_mode={m.padding_mode!r}")
        return ir.Conv2d(m.weight, m.bias, _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.groups)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.running_mean is None:
            raise ValueError("BatchNorm without running statistics")
        return ir.BatchNorm(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    if isinstance(m, nn.ReLU):
        return ir.ReLU()
    if isinstance(m, nn.LeakyReLU):
        return ir.LeakyReLU(m.negative_slope)
    if isinstance(m, nn.Sigmoid):
        return ir.Sigmoid()
    if isinstance(m, nn.Tanh):
        return ir.Tanh()
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ValueError("return_indices=True")
        return ir.MaxPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                            _pair(m.dilation), m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override:
            raise ValueError("divisor_override")
        return ir.AvgPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding), m.ceil_mode,
                            m.count_include_pad)
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
        return ir.GlobalAvgPool()
    if isinstance(m, nn.Flatten):
        return ("flatten", m.start_dim, m.end_dim)
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return None
    raise ValueError("module type not supported")


_ACTIVATION_FNS = {torch.relu: ir.ReLU, F.relu: ir.ReLU, torch.sigmoid: ir.Sigmoid, torch.tanh: ir.Tanh,
                   F.sigmoid: ir.Sigmoid, F.tanh: ir.Tanh, torch.exp: ir.Exp}


def from_torch(module: nn.Module, input_shape: Sequence[int]) -> ir.Graph:
    """Import `module` for per-sample input shape `input_shape` (no batch dimension)."""
    import torch.fx as fx

    try:
        traced = fx.symbolic_trace(module)
    except Exception as e:
        raise VerikitError(f"cannot trace {type(module).__name__} with torch.fx: {e}") from None
    p = next(module.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    builder = ir.GraphBuilder("input", tuple(input_shape), dtype, type(module).__name__)
    env: dict[str, object] = {}  # fx node name -> IR node name, or a python constant
    problems = []
    poisoned: set[str] = set()  # nodes downstream of an unsupported one: not reported twice
    output = None
    modules = dict(traced.named_modules())
    for node in traced.graph.nodes:
        if any(a.name in poisoned for a in node.all_input_nodes):
            poisoned.add(node.name)
            continue
        try:
            if node.op == "placeholder":
                if env:
                    raise ValueError("more than one input")
                env[node.name] = builder.input_name
            elif node.op == "output":
                output = env[node.args[0].name]
            elif node.op == "get_attr":
                raise ValueError("direct parameter access in forward")
            else:
                env[node.name] = _convert(node, env, builder, modules)
        except (ValueError, KeyError, TypeError) as e:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            kind = type(modules[node.target]).__name__ if node.op == "call_module" else target
            problems.append((node.name, kind, str(e)))
            poisoned.add(node.name)
    if problems:
        raise UnsupportedOpsError(problems)
    return builder.build(output)


def _arg(env, a):
    return env[a.name] if hasattr(a, "name") and hasattr(a, "op") else a


def _is_data(env, a, builder) -> bool:
    return hasattr(a, "op") and isinstance(env.get(a.name), str) and env[a.name] in builder.examples


def _reshape(builder, name, src, sample_shape):
    return builder.add(name, ir.Reshape(tuple(int(s) for s in sample_shape)), [src])


def _flatten(builder, name, src, start, end):
    shape = (1,) + builder.shape(src)
    start = start % len(shape)
    if start == 0:
        raise ValueError("flatten over the batch dimension")
    out = torch.empty(shape).flatten(start, end).shape
    return _reshape(builder, name, src, out[1:])


def _convert(node, env, builder, modules):
    name = node.name
    if node.op == "call_module":
        op = _module_op(modules[node.target])
        src = _arg(env, node.args[0])
        if op is None:
            return src
        if isinstance(op, tuple):
            return _flatten(builder, name, src, op[1], op[2])
        return builder.add(name, op, [src])
    fn, args = node.target, node.args
    if node.op == "call_function" and fn in _ACTIVATION_FNS:
        return builder.add(name, _ACTIVATION_FNS[fn](), [_arg(env, args[0])])
    if node.op == "call_function" and fn is F.leaky_relu:
        slope = args[1] if len(args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return builder.add(name, ir.LeakyReLU(slope), [_arg(env, args[0])])
    if node.op == "call_method" and fn in ("relu", "sigmoid", "tanh"):
        return builder.add(name, {"relu": ir.ReLU, "sigmoid": ir.Sigmoid, "tanh": ir.Tanh}[fn](), [_arg(env, args[0])])
    if (node.op == "call_function" and fn is torch.flatten) or (node.op == "call_method" and fn == "flatten"):
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0 if node.op == "call_function" else 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        if start == 0:
            raise ValueError("flatten over the batch dimension (use start_dim=1)")
        return _flatten(builder, name, _arg(env, args[0]), start, end)
    if node.op == "call_method" and fn in ("view", "reshape"):
        src = _arg(env, args[0])
        shape = args[1:] if not isinstance(args[1], (tuple, list)) else args[1]
        shape = [s if isinstance(s, int) else -1 for s in shape]  # x.size(0) -> the batch dimension
        out = torch.empty((1,) + builder.shape(src)).reshape(shape).shape
        return _reshape(builder, name, src, out[1:])
    if node.op == "call_function" and fn in (operator.add, torch.add, operator.sub, torch.sub):
        a, b = args[0], args[1]
        sub = fn in (operator.sub, torch.sub)
        if _is_data(env, a, builder) and _is_data(env, b, builder):
            rhs = _arg(env, b)
            if sub:
                rhs = builder.add(name + "_neg", ir.ElementwiseAffine(torch.tensor(-1.0)), [rhs])
            return builder.add(name, ir.Add(), [_arg(env, a), rhs])
        if _is_data(env, a, builder):
            c = torch.as_tensor(b, dtype=builder.examples[builder.input_name].dtype)
            return builder.add(name, ir.ElementwiseAffine(None, -c if sub else c), [_arg(env, a)])
        c = torch.as_tensor(a, dtype=builder.examples[builder.input_name].dtype)
        return builder.add(name, ir.ElementwiseAffine(torch.tensor(-1.0) if sub else None, c), [_arg(env, b)])
    if node.op == "call_function" and fn in (operator.mul, torch.mul, operator.truediv, torch.div):
        a, b = args[0], args[1]
        if _is_data(env, a, builder) and _is_data(env, b, builder):
            raise ValueError("product of two data tensors is not linear")
        div = fn in (operator.truediv, torch.div)
        if div and not _is_data(env, a, builder):
            raise ValueError("constant divided by data is not linear")
        data, c = (a, b) if _is_data(env, a, builder) else (b, a)
        c = torch.as_tensor(c, dtype=builder.examples[builder.input_name].dtype)
        return builder.add(name, ir.ElementwiseAffine(1.0 / c if div else c, None), [_arg(env, data)])
    if node.op == "call_function" and fn is torch.cat:
        xs = [_arg(env, a) for a in args[0]]
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        rank = len(builder.shape(xs[0])) + 1
        dim = dim % rank
        if dim == 0:
            raise ValueError("concatenation along the batch dimension")
        return builder.add(name, ir.Concat(dim), xs)
    raise ValueError("operation not supported")
