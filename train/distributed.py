"""Data-parallel training over torch.distributed, launched by torchrun (one process per GPU,
or per CPU group): `torchrun --nproc-per-node K -m verikit.train ...`.

Each rank takes a contiguous shard of every global batch (the trainer's own per-epoch order,
seeded the same on every rank, so the shards of all ranks put together are exactly the batch a
single process would train on), runs the PGD region selection and the box bounds on its
shard, and the gradients are summed over the ranks after the backward pass, each rank's loss
weighted by its share of the batch: the update is that of one process on the whole batch.

Why not the `DistributedDataParallel` wrapper: the certified loss runs through the IR graph,
which holds the module's parameters directly, not through `module.forward`, so the wrapper's
gradient hooks would not be armed. The reduction here is what it would do (an all-reduce of
the gradients in one flat buffer), with BatchNorm synchronised inside the graph: the clean
batch's statistics are reduced over the ranks (differentiably), as SyncBatchNorm does.

Random starts of the attack are drawn for the whole global batch from the shared generator
and each rank takes its slice, so every sample gets the start it gets in a single process.
Rank 0 alone writes checkpoints, metrics, plots and the ONNX export. Backend: nccl on GPUs,
gloo on CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from verikit.errors import VerikitError

TORCHRUN_HINT = "torchrun --nproc-per-node K -m verikit.train ..."


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ---- the batch ------------------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a batch of n samples (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    # ---- reductions -----------------------------------------------------------------------
    def sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def all_reduce_gradients(self, params) -> None:
        """Sum the gradients over the ranks (one flat buffer; a parameter without a gradient
        on some rank counts as zero there)."""
        params = [p for p in params if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def batchnorm_stats(self, x: torch.Tensor, dims: list):
        """Mean and (biased) variance per channel over the whole global batch, differentiable
        (two passes: the mean first, then the squared deviations from it)."""
        all_reduce = _SumOverRanks.apply
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        var = all_reduce(((x - mean.reshape(shape)) ** 2).sum(dims)) / n
        return mean, var

    def barrier(self) -> None:
        dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: every rank's loss depends on every rank's input, so the
    gradient of the summed loss w.r.t. this rank's input is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def start(required: bool, device: str = "auto") -> Optional[DistContext]:
    """The process group of a torchrun launch (None when not launched by torchrun and not
    `required`). `device` is the --device flag: cuda (or auto with a GPU) uses nccl."""
    if not launched_by_torchrun():
        if required:
            raise VerikitError(f"--ddp: this process was not started by torchrun (no RANK/WORLD_SIZE); run {TORCHRUN_HINT}")
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise VerikitError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        raise VerikitError("--device cuda: no CUDA device is available")
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, backend)


def stop(ctx: Optional[DistContext]) -> None:
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()
