"""Data-parallel training (train/distributed.py) with the gloo backend and 2 CPU processes:
the same weights as one process on the whole batches, only rank 0 writes, resume is exact,
and the torchrun command line works end to end."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from verikit.train.config import TrainConfig

# batch 7 over 2 ranks: shards of 4 and 3 (unequal shares are weighted); epoch 1 is clean
# training (BatchNorm statistics synchronised), epoch 2 SABR with PGD-placed boxes
CONFIG = dict(dataset="mnist", model="bn-tiny", method="sabr", eps=0.1, epochs=2, batch_size=7, lr=1e-3,
              warmup_epochs=1, ramp_epochs=1, reg_weight=0.0, seed=3, device="cpu", eval_samples=8)


def _bn_tiny(in_shape, num_classes):
    """Convolution and linear layers with BatchNorm after each (no biases BatchNorm would cancel)."""
    return [nn.Conv2d(in_shape[0], 4, 5, stride=3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
            nn.Linear(4 * 8 * 8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes)]


def _register():
    from verikit.models import architectures

    architectures.ARCHITECTURES.setdefault("bn-tiny", _bn_tiny)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(21, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (21,), generator=g)
    return x, y, x[:8].clone(), y[:8].clone()


def _trainer(cfg, out, dist=None):
    from verikit.train.loop import Trainer

    _register()
    t = Trainer(TrainConfig(**cfg), str(out), data=_data(), log=lambda s: None, dist=dist)
    t.checkpoint_seconds = 0
    return t


def _rank(rank, world, port, cfg, tmp):
    """One rank: an uninterrupted run ("ddp"), a run stopped after its first epoch ("first") and
    that run resumed from its checkpoint ("resumed"), each rank writing to its own folder."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from verikit.train.distributed import start, stop
    from verikit.train.loop import read_checkpoint

    dist = start(required=True, device="cpu")
    out = lambda name: os.path.join(tmp, f"{name}-rank{rank}")
    try:
        _trainer(cfg, out("ddp"), dist).fit(progress=False)
        _trainer(cfg, out("first"), dist).run_epoch(progress=False)  # as if killed after epoch 1
        dist.barrier()
        t = _trainer(cfg, out("resumed"), dist)
        t.restore(read_checkpoint(os.path.join(tmp, "first-rank0", "checkpoint.pt")))
        t.fit(progress=False)
    finally:
        stop(dist)
    # The work is done and the process group destroyed; skip the interpreter's teardown, which
    # on this machine aborted the spawned rank about half the time after another test module
    # had run in the parent ("terminate called without an active exception", SIGABRT, no Python
    # frame left: a C++ destructor at exit). An exception above still reaches mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp(tmp_path, cfg=CONFIG):
    mp.spawn(_rank, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    single = _trainer(CONFIG, tmp / "single")
    single.fit(progress=False)
    _ddp(tmp)
    return tmp, single, (str(tmp / "ddp-rank0"), str(tmp / "ddp-rank1"))


def test_two_gloo_ranks_train_the_weights_of_one_process_on_the_whole_batches(runs):
    tmp, single, (rank0, _) = runs
    got = _weights(rank0)
    assert got["epoch"] == 2
    for k, v in single.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(got["model"][k], v, rtol=1e-4, atol=1e-6), k
        else:
            assert torch.equal(got["model"][k], v), k
    assert not torch.equal(got["model"]["1.weight"], _trainer(CONFIG, tmp / "fresh").model.state_dict()["1.weight"])
    for a, b in zip(got["metrics"], single.metrics):  # the logged loss is the whole batch's
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]) and a["test_acc"] == b["test_acc"]


def test_only_rank_0_writes(runs):
    tmp, _, (rank0, rank1) = runs
    assert sorted(os.listdir(rank0)) == ["checkpoint.pt", "config.json", "metrics.csv"]
    for name in ("ddp", "first", "resumed"):  # rank 1 had folders of its own: it wrote nothing there
        assert not os.path.exists(tmp / f"{name}-rank1")


def test_a_resumed_ddp_run_is_bit_identical_to_an_uninterrupted_one(runs):
    tmp, _, (rank0, _) = runs
    assert _weights(tmp / "first-rank0")["epoch"] == 1
    a, b = _weights(tmp / "resumed-rank0"), _weights(rank0)
    assert a["epoch"] == b["epoch"] == 2
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_batch_shards_cover_the_batch_in_order():
    from verikit.train.distributed import DistContext

    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [DistContext(r, world, r, "gloo").shard(n) for r in range(world)]
            assert sum((list(range(n))[p] for p in parts), []) == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_ddp_flag_outside_torchrun_is_bad_input(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from verikit.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    res = CliRunner().invoke(main, ["train", "--ddp", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "torchrun" in res.stderr and not os.path.exists(tmp_path / "run")


def test_torchrun_runs_the_cli_with_two_ranks(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "verikit.train", "--model", "mlp", "--method", "standard", "--train-samples", "32", "--batch-size", "16",
           "--eval-samples", "16", "--epochs", "1", "--quiet", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "curves.png", "metrics.csv", "model.onnx"]
    assert res.stdout.count("epoch 1:") == 1  # one rank reports
    assert "x 2 ranks (gloo)" in res.stdout + res.stderr
