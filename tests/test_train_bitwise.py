"""Speed work must not change training: a few steps of the shipped models' recipe (cnn-small,
SABR λ = 0.4, ε ramp with the warm-up regulariser, IBP initialisation, seed 0) and of a
BatchNorm net (IBP and SABR) end in exactly the parameters they ended in before the box pass,
the spec folding and the SABR step were optimised.

The fingerprints were recorded with the code before those changes (commit 1b4aef4 of main),
one torch thread, on this project's machines (torch 2.13 CPU). They are exact hashes: a float
kernel that rounds differently (another CPU family, another torch build) changes them too, so
on such a machine regenerate them from the old commit with
`python tests/test_train_bitwise.py` before comparing.
"""
import hashlib
import sys

import pytest
import torch
import torch.nn as nn

from verikit.models import architectures
from verikit.train.config import TrainConfig
from verikit.train.loop import Trainer

# the kernels torch dispatches to (and so the rounding) depend on the CPU's vector extensions:
# the fingerprints hold for the capability they were recorded on
RECORDED_ON = "AVX512"
EXPECTED = {
    "cnn-small-sabr": "efa5d95eb2fd4e9599f55d33d7566b9e0c927bdf21b0535d23c2229191d9aca4",
    "tiny-bn-ibp": "94cbd4c7c1e338834c8f061cb2a1c57cdc6ccf911af4ff9989b2a9e6a3d57713",
    "tiny-bn-sabr": "aa0fdbc0e3393cc08489554780486921a1a54120b89a693d6e12285c338bcc37",
}


def tiny_bn(in_shape, num_classes):
    c = in_shape[0]
    return [nn.Conv2d(c, 4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9 * 9, 16),
            nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes)]


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand(n, 1, 28, 28, generator=g) * 0.3 + (y.float() / 10).view(-1, 1, 1, 1) * 0.7).clamp(0, 1)
    return x, y, x[:16], y[:16]


CASES = {  # name: (model, λ)
    "cnn-small-sabr": ("cnn-small", 0.4),
    "tiny-bn-sabr": ("tiny-bn", 0.4),
    "tiny-bn-ibp": ("tiny-bn", 1.0),
}


def fingerprint(case: str) -> str:
    """sha256 of every parameter and buffer after three training steps inside the ε ramp."""
    model, lam = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    added = model not in architectures.ARCHITECTURES
    if added:
        architectures.ARCHITECTURES[model] = tiny_bn
    try:
        cfg = TrainConfig(model=model, dataset="mnist", eps=0.1, sabr_lambda=lam, epochs=12, batch_size=32,
                          warmup_epochs=1, ramp_epochs=3, eval_samples=16, seed=0)
        tr = Trainer(cfg, "/tmp/verikit-bitwise-unused", data=_data(), log=lambda s: None)
        gen = torch.Generator().manual_seed(7)
        for step in range(3):
            idx = slice(32 * step, 32 * (step + 1))
            tr.step(tr.xtr[idx], tr.ytr[idx], 0.02 + 0.01 * step, 1, gen)  # epoch 1: ramp, regulariser on
        h = hashlib.sha256()
        for name, t in sorted(tr.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest()
    finally:
        torch.set_num_threads(threads)
        if added:
            del architectures.ARCHITECTURES[model]


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != RECORDED_ON,
                    reason=f"fingerprints were recorded on a {RECORDED_ON} CPU; regenerate them from the old commit here")
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_steps_are_bit_identical_to_before(case):
    assert fingerprint(case) == EXPECTED[case]


if __name__ == "__main__":  # print the fingerprints of the checked-out code
    for c in sorted(CASES) if len(sys.argv) < 2 else sys.argv[1:]:
        print(f'    "{c}": "{fingerprint(c)}",')
