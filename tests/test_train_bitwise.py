"""Speed work must not change training: a few steps of the shipped models' recipe (cnn-small,
SABR λ = 0.4, ε ramp with the warm-up regulariser, IBP initialisation, seed 0) and of a
BatchNorm net (IBP and SABR) end in exactly the parameters they ended in before the box pass,
the spec folding and the SABR step were optimised.

The fingerprints were recorded with the code before those changes (commit 1b4aef4 of main),
one torch thread, torch 2.13 CPU, once per kind of machine this project ran on. They are exact
hashes: a float kernel that rounds differently (another CPU vendor or family, another torch
build) changes them too, so each set is keyed by the machine it was recorded on. On a machine
of a recorded kind the fingerprint must equal that kind's; on another kind the test skips
(regenerate the set there from the old commit with `python tests/test_train_bitwise.py` and add
it). The AVX512 AMD set was recorded from commit 1b4aef4 on 2026-12-04, and the current code gave the
same three hashes there; the AVX2 AMD set from 1b4aef4 on 2026-12-07, where the current code gave
the same three.
"""
import hashlib
import sys

import pytest
import torch
import torch.nn as nn

from verikit.models import architectures
from verikit.train.config import TrainConfig
from verikit.train.loop import Trainer



def machine() -> tuple[str, str]:
    """(torch's CPU capability, the CPU vendor): the kernels torch dispatches to, and so the
    rounding, depend on both (MKL takes other code paths on AMD than on Intel)."""
    vendor = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability(), vendor
EXPECTED = {  # machine() -> case -> sha256
    # the first machines: AVX512, vendor not recorded then (assumed Intel: the AMD hashes differ)
    ("AVX512", "GenuineIntel"): {
        "cnn-small-sabr": "efa5d95eb2fd4e9599f55d33d7566b9e0c927bdf21b0535d23c2229191d9aca4",
        "tiny-bn-ibp": "94cbd4c7c1e338834c8f061cb2a1c57cdc6ccf911af4ff9989b2a9e6a3d57713",
        "tiny-bn-sabr": "aa0fdbc0e3393cc08489554780486921a1a54120b89a693d6e12285c338bcc37",
    },
    ("AVX2", "AuthenticAMD"): {  # recorded from 1b4aef4 on 2026-12-07
        "cnn-small-sabr": "4f1f45980c7b0b7f81dfb7d676f42074208e4628f7a7859a2248d37f89e73260",
        "tiny-bn-ibp": "bb24b18c5027f9df35012b721c59f3fd95faca538019c7e3df9eaf03d98f17e6",
        "tiny-bn-sabr": "435281a1fb4e505816399c3a22dc02436eea459a1b16848d5a470086100b8843",
    },
    ("AVX512", "AuthenticAMD"): {
        "cnn-small-sabr": "6f2fe3d7070b25b05ab71da680886fb4365a7e33934aec0666b067c43958713c",
        "tiny-bn-ibp": "fb9eb934165866c0e9b7ff14cd0ba6f02b78860ace8142005f39853ad096cf8d",
        "tiny-bn-sabr": "d89994a4328f2a8e2b064b6e58ef7a8173a935e4c21edd994cc64169017d43c1",
    },
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


@pytest.mark.skipif(machine() not in EXPECTED,
                    reason=f"no fingerprints recorded on a {machine()} machine; regenerate them from the old commit here")
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_steps_are_bit_identical_to_before(case):
    assert fingerprint(case) == EXPECTED[machine()][case]


if __name__ == "__main__":  # print the fingerprints of the checked-out code
    print(f"    {machine()}: {{")
    for c in sorted(CASES) if len(sys.argv) < 2 else sys.argv[1:]:
        print(f'    "{c}": "{fingerprint(c)}",')
