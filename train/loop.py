"""The training loop: epochs of steps of a registered training method (train/methods.py), per-epoch evaluation,
metrics CSV, a checkpoint every epoch (model, optimizer, RNG), exact resume, plot, ONNX export.

Determinism: the batch order and the attack's random starts of epoch e come from generators
seeded with (seed, e), so a run resumed from the checkpoint of epoch e repeats exactly what an
uninterrupted run does from there.

Data parallel (torchrun, train/distributed.py): with a `DistContext` each rank trains on its
shard of every batch, gradients and BatchNorm statistics are reduced over the ranks, and only
rank 0 evaluates (the others receive its figures) and writes files.

Interruptions: Ctrl-C / SIGTERM during a step abandon that step and restore what it had
changed so far (random generators, BatchNorm buffers; the weights and the optimizer change
only in the update, which runs with signals deferred), then a mid-epoch checkpoint is saved,
so even a run stopped in its first epoch resumes bit-identically. A checkpoint is also saved
every `checkpoint_minutes` of training (so SIGKILL loses at most that much) and after every
epoch.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from verikit import ir
from verikit.errors import VerikitError
from verikit.interrupts import deferred_signals
from verikit.outputs import atomic_write
from verikit.progress import Progress

from .config import TrainConfig
from .losses import get_training_domain, l1_penalty, warmup_regularizer
from .methods import StepInputs, get_method
from .schedule import EpsSchedule, lr_at

METRIC_FIELDS = ["epoch", "method", "eps", "lambda", "lr", "loss", "train_cert_acc", "test_acc", "pgd_acc",
                 "box_cert_acc", "time_s"]
CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("config.json", "metrics.csv", CHECKPOINT, "curves.png", "model.onnx")


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise VerikitError("--device cuda: no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _batchnorm_pairs(model: nn.Module, graph: ir.Graph):
    """(graph node key, BN module, values per channel per sample) for every BatchNorm, if each
    maps to exactly one graph node and uses a momentum: then the batch statistics the graph
    records can update the running ones, and no separate train-mode forward is needed.
    None otherwise (the loop then falls back to that forward)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    nodes = [n for n in graph.nodes if isinstance(n.op, ir.BatchNorm)]
    pairs = []
    for m in bns:
        match = [n for n in nodes if n.op.running_mean is m.running_mean]
        if len(match) != 1 or m.momentum is None or not m.track_running_stats:
            return None
        spatial = 1
        for d in graph.shapes[match[0].name][1:]:
            spatial *= d
        pairs.append((match[0].op.key, m, spatial))
    return pairs


@torch.no_grad()
def _update_running_stats(pairs, ctx: ir.EvalContext, batch: int) -> None:
    """What a train-mode forward does to BatchNorm's buffers, from the recorded batch statistics
    (running var is updated with the unbiased variance, as in PyTorch)."""
    for key, m, spatial in pairs:
        mean, var = ctx.bn_stats[key]
        n = batch * spatial  # values per channel
        m.running_mean.mul_(1 - m.momentum).add_(mean.detach(), alpha=m.momentum)
        m.running_var.mul_(1 - m.momentum).add_(var.detach() * (n / max(n - 1, 1)), alpha=m.momentum)
        m.num_batches_tracked.add_(1)


class Trainer:
    """Holds the model, its live IR graph, the optimizer and the data of one run."""

    def __init__(self, cfg: TrainConfig, out_dir: str, data=None, log: Callable[[str], None] = print, dist=None):
        from verikit import from_torch
        from verikit.models.architectures import DATASET_SHAPES, build_model

        from verikit.data_sources import load_dataset
        from .init import ibp_init

        self.cfg = cfg.resolved()
        self.out_dir = out_dir
        self.dist = dist  # DistContext of a torchrun launch, or None
        self.is_main = dist is None or dist.is_main
        self.log = log if self.is_main else (lambda text: None)
        self.device = dist.device if dist is not None else pick_device(self.cfg.device)
        torch.manual_seed(self.cfg.seed)
        shape, _, _, self.num_classes = DATASET_SHAPES[self.cfg.dataset]
        self.model = build_model(self.cfg.model, self.cfg.dataset)
        if self.cfg.init == "ibp":
            ibp_init(self.model, torch.Generator().manual_seed(self.cfg.seed))
        self.model.to(self.device)
        self.graph = from_torch(self.model, shape)  # live parameters: bounds are differentiable
        self.train_graph = self.graph
        if self.cfg.relu_shrink < 1:
            from .shrink import with_relu_shrinking

            self.train_graph = with_relu_shrinking(self.graph, self.cfg.relu_shrink)
        self.method = get_method(self.cfg.method, self.cfg.dataset, self.cfg.eps, **self.cfg.method_options)
        self.domain = get_training_domain(self.cfg.domain) if self.method.uses_domain else None
        self.method.setup(self)
        self.has_bn = _has_batchnorm(self.model)
        self.bn_pairs = _batchnorm_pairs(self.model, self.train_graph)
        if dist is not None:
            if self.has_bn and self.bn_pairs is None:
                raise VerikitError("data-parallel training needs every BatchNorm layer to map to one graph node "
                                   "with a momentum (its statistics are synchronised there)")
            dist.broadcast_parameters(self.model)  # the same start on every rank, whatever the seeding
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr)
        if data is None:
            xtr, ytr = load_dataset(self.cfg.dataset, "train")
            xte, yte = load_dataset(self.cfg.dataset, "test")
            data = (xtr, ytr, xte, yte)
        xtr, ytr, xte, yte = data
        if self.cfg.train_samples:
            xtr, ytr = xtr[: self.cfg.train_samples], ytr[: self.cfg.train_samples]
        self.xtr, self.ytr = xtr, ytr
        self.xte, self.yte = xte[: self.cfg.eval_samples], yte[: self.cfg.eval_samples]
        self.steps_per_epoch = (xtr.shape[0] + self.cfg.batch_size - 1) // self.cfg.batch_size
        self.eps_at = EpsSchedule(self.cfg.eps, self.cfg.warmup_epochs, self.cfg.ramp_epochs, self.steps_per_epoch)
        self.epoch = 0  # epochs completed
        self.metrics: list[dict] = []
        self.partial: Optional[dict] = None  # progress inside epoch `self.epoch` (mid-epoch checkpoint)
        self.checkpoint_seconds = 600.0  # mid-epoch checkpoint interval during an epoch (0: off)

    # ---- one step -------------------------------------------------------------------------
    def loss_on_batch(self, x: torch.Tensor, y: torch.Tensor, eps: float, epoch: int,
                      gen: Optional[torch.Generator] = None, shard: Optional[tuple] = None) -> tuple[torch.Tensor, float]:
        """The training loss of one batch (the method's, from the registry) and the fraction of
        it certified on the region the method bounds (nan if it bounds none).
        `shard` (global batch size, this rank's slice): x, y are this rank's part of the batch;
        the loss is then weighted by that part's share, so the ranks' losses add up to the
        loss of the whole batch."""
        cfg = self.cfg
        self.model.train()
        total = shard[0] if shard is not None else x.shape[0]
        share = x.shape[0] / total
        reduce = self.dist.batchnorm_stats if shard is not None else None
        if not self.method.uses_domain or eps == 0:  # standard training, and every method's warm-up
            if shard is not None and self.has_bn:  # train-mode BatchNorm with statistics of the global batch
                ctx = ir.EvalContext(bn_mode="batch", bn_reduce=reduce)
                logits = self.graph.forward(x, ctx=ctx)
                _update_running_stats(self.bn_pairs, ctx, total)
            else:
                logits = self.model(x)
            loss = share * F.cross_entropy(logits, y)
            cert = float("nan")
        else:
            out = self.method.loss(StepInputs(self, x, y, eps, cfg.eps, epoch, gen, shard))
            loss = out.loss
            if out.region is not None and self.eps_at.in_ramp(epoch) and cfg.reg_weight > 0 and eps < cfg.eps:
                reg = warmup_regularizer(self.train_graph, out.store, out.region)  # data parallel: per rank's shard
                loss = loss + cfg.reg_weight * (1 - eps / cfg.eps) * reg
            loss = share * loss
            cert = float("nan")
            if out.lower is not None:
                others = torch.ones_like(out.lower, dtype=torch.bool).scatter_(1, y[:, None], False)
                cert = share * float(((out.lower > 0) | ~others).all(1).float().mean())
        if cfg.l1 > 0 and self.is_main:  # a term of the weights: counted once over the ranks
            loss = loss + cfg.l1 * l1_penalty(self.model)
        return loss, cert

    def batch_norm_context(self, x: torch.Tensor, shard: Optional[tuple] = None) -> Optional[ir.EvalContext]:
        """For models with BatchNorm: a context holding the clean batch's statistics (bounds use
        them; under data parallelism those of the global batch), with the running statistics
        updated as a train-mode forward would. None otherwise."""
        if not self.has_bn:
            return None
        reduce = self.dist.batchnorm_stats if shard is not None else None
        ctx = ir.EvalContext(bn_mode="batch", bn_reduce=reduce)
        self.train_graph.forward(x, ctx=ctx)  # records the clean batch's statistics
        if self.bn_pairs is not None:
            _update_running_stats(self.bn_pairs, ctx, shard[0] if shard is not None else x.shape[0])
        else:
            with torch.no_grad():
                self.model(x)  # train-mode forward: updates the running statistics
        return ctx

    def step(self, x, y, eps, epoch, gen=None) -> tuple[float, float]:
        loss, cert = self._loss_and_gradients(x, y, eps, epoch, gen)
        self._update()
        return loss, cert

    def _loss_and_gradients(self, x, y, eps, epoch, gen=None, shard=None) -> tuple[float, float]:
        loss, cert = self.loss_on_batch(x, y, eps, epoch, gen, shard)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if shard is None:
            return float(loss.detach()), cert
        self.dist.all_reduce_gradients(self.model.parameters())  # the gradient of the whole batch's loss
        return self.dist.sum(float(loss.detach())), (self.dist.sum(cert) if cert == cert else cert)

    def _update(self) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()

    # ---- epochs ---------------------------------------------------------------------------
    def _generators(self, epoch: int):
        base = (self.cfg.seed + 1) * 100_003 + epoch
        return torch.Generator().manual_seed(base), torch.Generator().manual_seed(base + 50_000_017)

    def _undo_state(self, gen: torch.Generator) -> dict:
        """What a step changes before its update: the random generators and BatchNorm buffers."""
        return {"gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "buffers": {k: v.detach().clone() for k, v in self.model.named_buffers()}}

    def _undo(self, state: dict, gen: torch.Generator) -> None:
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(state["buffers"][k])
        self.opt.zero_grad(set_to_none=True)

    def run_epoch(self, progress: bool = True) -> dict:
        from .evaluate import evaluate

        cfg, e = self.cfg, self.epoch
        lr = lr_at(e, cfg.lr, cfg.lr_milestones, cfg.lr_decay)
        for g in self.opt.param_groups:
            g["lr"] = lr
        shuffle_gen, attack_gen = self._generators(e)
        order = torch.randperm(self.xtr.shape[0], generator=shuffle_gen)
        part = self.partial or {"step": 0, "loss": 0.0, "cert": 0.0, "n_cert": 0, "seconds": 0.0}
        if self.partial is not None:
            attack_gen.set_state(self.partial["gen"])
        self.partial = None
        start, tot_loss, tot_cert, n_cert = part["step"], part["loss"], part["cert"], part["n_cert"]
        t0 = time.perf_counter() - part["seconds"]
        last_save = time.perf_counter()

        def keep(step: int, interrupted: bool = True) -> None:  # mid-epoch checkpoint: resume continues at `step`
            self.partial = {"step": step, "loss": tot_loss, "cert": tot_cert, "n_cert": n_cert,
                            "seconds": time.perf_counter() - t0, "gen": attack_gen.get_state()}
            self.save_checkpoint()
            if not interrupted:
                self.partial = None  # the epoch goes on; `partial` describes only what was saved

        progress = progress and self.is_main
        with Progress(self.steps_per_epoch, f"epoch {e + 1}/{cfg.epochs}", unit="steps", enabled=progress) as bar:
            bar.update(start)
            for s in range(start, self.steps_per_epoch):
                undo = self._undo_state(attack_gen)
                try:
                    idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                    shard = None
                    if self.dist is not None:  # this rank's part of the batch
                        shard = (len(idx), self.dist.shard(len(idx)))
                        idx = idx[shard[1]]
                    x, y = self.xtr[idx].to(self.device), self.ytr[idx].to(self.device)
                    eps = self.eps_at(e, s)
                    loss, cert = self._loss_and_gradients(x, y, eps, e, attack_gen, shard)
                except KeyboardInterrupt:
                    self._undo(undo, attack_gen)  # as if step s had not started
                    keep(s)
                    raise
                try:
                    with deferred_signals(lambda: None):  # the update is never cut in half
                        self._update()
                        tot_loss += loss
                        if cert == cert:
                            tot_cert += cert
                            n_cert += 1
                except KeyboardInterrupt:
                    keep(s + 1)
                    raise
                bar.update(1, f"loss {tot_loss / (s + 1):.4f} eps {eps:.4f}")
                if self.checkpoint_seconds and time.perf_counter() - last_save >= self.checkpoint_seconds \
                        and s + 1 < self.steps_per_epoch:
                    keep(s + 1, interrupted=False)
                    last_save = time.perf_counter()
        train_time = time.perf_counter() - t0
        try:
            ev = None
            if self.is_main:  # the other ranks hold the same weights: rank 0's figures are theirs
                ev = evaluate(self.model, self.graph, self.xte, self.yte, cfg.eps, self.num_classes,
                              seed=cfg.seed, data_range=cfg.data_range)
            if self.dist is not None:
                ev = self.dist.broadcast_object(ev)
        except KeyboardInterrupt:
            keep(self.steps_per_epoch)  # every step done; resume re-runs only the evaluation
            raise
        row = {"epoch": e + 1, "method": cfg.kind, "eps": self.eps_at(e, self.steps_per_epoch - 1),
               "lambda": cfg.sabr_lambda, "lr": lr, "loss": tot_loss / self.steps_per_epoch,
               "train_cert_acc": tot_cert / n_cert if n_cert else float("nan"), **ev, "time_s": train_time}
        with deferred_signals(lambda: None):  # the finished epoch is recorded whole, or not at all
            self.partial = None
            self.metrics.append(row)
            self.epoch += 1
            self.log(f"epoch {row['epoch']}: loss {row['loss']:.4f}  eps {row['eps']:.4f}  clean "
                     f"{row['test_acc']:.3f}  pgd {row['pgd_acc']:.3f}  box-cert {row['box_cert_acc']:.3f}  "
                     f"({row['time_s']:.0f} s)")
            self.write_metrics()
            self.save_checkpoint()
        return row

    def fit(self, progress: bool = True) -> list[dict]:
        """Train until `cfg.epochs` epochs are done, saving metrics and a checkpoint after each."""
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with atomic_write(os.path.join(self.out_dir, "config.json")) as f:
                json.dump(self.cfg.to_dict(), f, indent=2)
        while self.epoch < self.cfg.epochs:
            self.run_epoch(progress)
        return self.metrics

    # ---- persistence ----------------------------------------------------------------------
    def write_metrics(self) -> None:
        if not self.is_main:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with atomic_write(os.path.join(self.out_dir, "metrics.csv"), newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            for r in self.metrics:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        state = {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "config": self.cfg.to_dict(), "metrics": self.metrics, "torch_rng": torch.get_rng_state(),
                 "partial": self.partial}
        os.makedirs(self.out_dir, exist_ok=True)
        tmp = os.path.join(self.out_dir, CHECKPOINT + ".tmp")
        with deferred_signals(lambda: None):  # never a half-written checkpoint
            torch.save(state, tmp)
            os.replace(tmp, os.path.join(self.out_dir, CHECKPOINT))

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint (end of an epoch, or mid-epoch after an interruption)."""
        self.restore(read_checkpoint(path))

    def restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])  # in place: the IR graph keeps its references
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise VerikitError(f"--resume: the checkpoint does not fit this run's model ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]})") from None
        self.epoch, self.metrics, self.partial = int(state["epoch"]), list(state["metrics"]), state.get("partial")
        torch.set_rng_state(state["torch_rng"])


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents, checked: a damaged or foreign file is a VerikitError, not a traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise VerikitError(f"--resume: no {CHECKPOINT} in {os.path.dirname(path) or '.'}") from None
    except Exception as e:  # truncated or foreign files fail with unpickling errors of every kind
        raise VerikitError(f"--resume: cannot read the checkpoint {path} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]}); it is damaged or not a verikit checkpoint") from None
    missing = [k for k in ("epoch", "model", "optimizer", "metrics", "torch_rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise VerikitError(f"--resume: {path} is not a verikit checkpoint (no {', '.join(missing)})")
    return state


def is_run_dir(path: str) -> bool:
    """Does `path` hold (part of) a training run?"""
    return any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES)


def resume_config(run_dir: str) -> TrainConfig:
    if not os.path.isdir(run_dir):
        raise VerikitError(f"--resume {run_dir}: no such run directory")
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        raise VerikitError(f"--resume {run_dir}: no {CHECKPOINT} there (a run stopped before its first checkpoint "
                           "has nothing to resume: start it again with --out DIR --force)")
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise VerikitError(f"--resume {run_dir}: cannot read config.json ({e})") from None
