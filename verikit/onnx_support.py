"""What the ONNX importer supports, checked per node without knowing any tensor shape.

`static_problem(node, is_data)` says why a node cannot be imported by its op type, its
attributes and which of its inputs carry data (rather than constants), or None. It runs on
every node, also downstream of an unsupported node (whose shapes are unknown), so one error
lists every unsupported node of a model. Attributes are whitelisted per op: an attribute the
importer does not implement is rejected by name, never ignored (an ignored attribute is a
silently wrong network).
"""
from __future__ import annotations

from typing import Callable, Optional

from .onnx_constants import node_attributes

# op -> attributes the importer implements, for ops on the data path
DATA_OPS: dict[str, set] = {
    "Gemm": {"alpha", "beta", "transA", "transB"},
    "MatMul": set(),
    "Add": set(), "Sub": set(), "Mul": set(), "Div": set(), "Neg": set(),
    "Conv": {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"},
    "BatchNormalization": {"epsilon", "momentum", "training_mode", "spatial", "is_test"},
    "AveragePool": {"auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads", "strides"},
    "MaxPool": {"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides"},
    "GlobalAveragePool": set(),
    "Pad": {"mode", "pads", "value"},
    "Flatten": {"axis"},
    "Reshape": {"allowzero", "shape"},
    "Transpose": {"perm"},
    "Squeeze": {"axes"},
    "Unsqueeze": {"axes"},
    "Concat": {"axis"},
    "Identity": set(),
    "Dropout": {"ratio", "seed", "is_test"},
    "Relu": set(),
    "LeakyRelu": {"alpha"},
    "Sigmoid": set(),
    "Tanh": set(),
    "Exp": set(),
    "Sign": set(),
    "Softmax": {"axis"},
    "Shape": {"start", "end"},
    "Slice": {"starts", "ends", "axes"},
    "Gather": {"axis"},
    "Split": {"axis", "split", "num_outputs"},
    "ConvTranspose": {"auto_pad", "dilations", "group", "kernel_shape", "output_padding", "output_shape", "pads",
                      "strides"},
    # cubic_coeff_a / extrapolation_value only matter for the cubic and tf_crop_and_resize modes, which are refused
    "Clip": {"min", "max"},  # Clip-6's attributes; from opset 11 min / max are constant inputs
    "Abs": set(), "Max": set(), "Min": set(),
    "Resize": {"mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside",
               "extrapolation_value", "antialias", "keep_aspect_ratio_policy"},
}

# op -> attributes, for ops evaluated at import time when all their inputs are constants
CONSTANT_OPS: dict[str, set] = {
    "Constant": {"value", "value_float", "value_floats", "value_int", "value_ints"},
    "Identity": set(), "Dropout": {"ratio", "seed", "is_test"},
    "Cast": {"to", "saturate"},
    "Gather": {"axis"},
    "Concat": {"axis"},
    "Unsqueeze": {"axes"}, "Squeeze": {"axes"},
    "Reshape": {"allowzero", "shape"},
    "Flatten": {"axis"},
    "Transpose": {"perm"},
    "Add": set(), "Sub": set(), "Mul": set(), "Div": set(), "MatMul": set(), "Neg": set(),
    "Slice": {"starts", "ends", "axes"},
    "ConstantOfShape": {"value"},
    "Range": set(),
    "Shape": {"start", "end"},
}

# data-path ops whose listed input positions must be constants (position -> what it is)
_CONSTANT_INPUTS = {
    "Gemm": {1: "B", 2: "C"},
    "Conv": {1: "weights", 2: "bias"},
    "BatchNormalization": {1: "scale", 2: "B", 3: "mean", 4: "var"},
    "Pad": {1: "pads", 2: "constant_value", 3: "axes"},
    "Reshape": {1: "shape"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "Dropout": {1: "ratio", 2: "training_mode"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"},
    "Gather": {1: "indices"},
    "Split": {1: "split"},
    "ConvTranspose": {1: "weights", 2: "bias"},
    "Resize": {1: "roi", 2: "scales", 3: "sizes"},
    "Clip": {1: "min", 2: "max"},
}
_NOT_SET = (None, b"NOTSET", "NOTSET")
_VALID = (b"VALID", "VALID")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _attribute_problem(op: str, a: dict, data_inputs: list) -> Optional[str]:
    """Values of known attributes that the importer does not implement."""
    if "auto_pad" in a and a["auto_pad"] not in _NOT_SET + _VALID:
        return f"auto_pad={_text(a['auto_pad'])} is not supported (use explicit pads)"
    if op == "AveragePool" and any(int(d) != 1 for d in a.get("dilations", [])):
        return f"dilations={list(a['dilations'])} are not supported for AveragePool"
    if op == "BatchNormalization":
        if a.get("training_mode", 0):
            return "training_mode=1 (batch statistics) is not supported"
        if "is_test" in a and not a["is_test"]:
            return "is_test=0 (training mode) is not supported"
    if op == "Dropout" and "is_test" in a and not a["is_test"]:
        return "is_test=0 (training mode) is not supported"
    if op == "Pad" and _text(a.get("mode", "constant")) != "constant":
        return f"mode={_text(a['mode'])} is not supported (only constant padding)"
    if op == "LeakyRelu" and float(a.get("alpha", 0.01)) < 0:
        return "negative alpha (not monotone) is not supported"
    if op == "Gemm" and a.get("transA", 0) and data_inputs and data_inputs[0]:
        return "transA=1 on the data input would move the batch dimension"
    if op in ("AveragePool", "MaxPool") and len(a.get("kernel_shape", [])) != 2:
        return f"only 2-D pooling (kernel_shape={list(a.get('kernel_shape', []))})"
    return None


def static_problem(node, is_data: Callable[[str], bool]) -> Optional[str]:
    """Why `node` cannot be imported, judged without shapes; None if it may be."""
    op = node.op_type
    inputs = list(node.input)
    data = [bool(i) and is_data(i) for i in inputs]
    table = DATA_OPS if any(data) else CONSTANT_OPS
    if op not in table:
        where = "" if any(data) or op in DATA_OPS else " on constants"
        return "operator not supported" + where
    a = node_attributes(node)
    unknown = sorted(set(a) - table[op])
    if unknown:
        return f"attribute(s) {', '.join(unknown)} not supported for {op}"
    if not any(data):
        return None
    for pos, what in _CONSTANT_INPUTS.get(op, {}).items():
        if pos < len(inputs) and data[pos]:
            return f"{what} (input {pos}) must be a constant, not data"
    if op == "Div" and len(data) >= 2 and all(data[:2]):
        return "division of two data tensors is not supported"
    if op == "Div" and not data[0]:
        return "constant divided by data is not linear"
    if op == "Concat" and not all(data):
        return "concatenating data with constants is not supported"
    if op in ("Conv", "BatchNormalization", "AveragePool", "MaxPool", "GlobalAveragePool", "Gemm", "ConvTranspose",
              "Resize", "Slice", "Gather", "Split") and not data[0]:
        return "the data must be the first input"
    return _attribute_problem(op, a, data)
