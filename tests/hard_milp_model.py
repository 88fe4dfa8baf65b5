"""A small ReLU network (20 inputs, 3 x 40 ReLUs, 2 outputs) whose robustness MILP on the whole
input cube takes HiGHS and Gurobi minutes: the class-0 bias is shifted so that the margin
y_0 - y_1 is barely positive on 200 000 random points, which leaves the solvers no quick proof
and no quick counterexample. Used to interrupt a running MILP (tests/test_interrupts.py).

The committed tests/data/hard_milp_20x40x3.onnx was written by `build(path)`."""
from __future__ import annotations

import torch
from torch import nn

N_INPUTS = 20


def build(path: str, seed: int = 0, width: int = 40, depth: int = 3, slack: float = 0.05) -> str:
    torch.manual_seed(seed)
    layers = [nn.Linear(N_INPUTS, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(width, 2))
    with torch.no_grad():
        out = net(torch.rand(200_000, N_INPUTS))
        net[-1].bias[0] += slack - float((out[:, 0] - out[:, 1]).min())
    torch.onnx.export(net, torch.zeros(1, N_INPUTS), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


if __name__ == "__main__":
    import os

    build(os.path.join(os.path.dirname(__file__), "data", "hard_milp_20x40x3.onnx"))
