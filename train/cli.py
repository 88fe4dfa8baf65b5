"""`verikit train`: certified training with a registered method (SABR, IBP, PGD, MTL-IBP, ...) or standard training.

Every flag is checked before any data is loaded. `--out` must not hold another run unless
`--resume` (continue it) or `--force` (replace it) says what to do. Ctrl-C / SIGTERM save a
mid-epoch checkpoint and print the command that continues the run (exit 130 / 143).
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys

import click
from click.core import ParameterSource

from verikit.cli import CONTEXT
from verikit.errors import VerikitError
from verikit.interrupts import Terminated, exit_code
from verikit.outputs import check_output_dir

# flags that may be given together with --resume; every other one is fixed by the saved run
_RESUME_FLAGS = {"resume_dir", "epochs", "threads", "quiet", "device", "checkpoint_minutes", "out_dir", "ddp"}


def _milestones(text):
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise VerikitError(f"--lr-milestones must be comma-separated epochs, got {text!r}") from None


def _eps(text):
    from verikit.eps import parse_eps_value

    return parse_eps_value(str(text))


def _given(ctx, name):
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _flag(ctx, name):
    return max(next(p for p in ctx.command.params if p.name == name).opts, key=len)


@click.command(context_settings=CONTEXT)
@click.option("--method", default="sabr",
              help="registered training method (`verikit methods`): sabr, ibp, pgd, standard, mtl-ibp, exp-ibp, "
                   "cc-ibp, crown-ibp, taps, staps, plug-ins")
@click.option("--method-option", "method_option", multiple=True, metavar="NAME=VALUE",
              help="an option of the method, e.g. alpha=0.3 (repeatable; `verikit methods --options`)")
@click.option("--domain", default="box", help="registered differentiable domain propagating the region")
@click.option("--sabr-lambda", type=float, default=None, show_default=False,
              help="small-box size λ in [0, 1]  [default: the paper's value for dataset/eps, else 0.4]")
@click.option("--dataset", default="mnist", help="mnist (bundled), fashion-mnist, cifar10 (downloaded)")
@click.option("--eps", default="0.1", help="target L∞ radius in [0, 1] pixel units: 0.1 or 8/255")
@click.option("--model", default="cnn7", help="cnn7, cnn-small or mlp")
@click.option("--epochs", type=int, default=70, help="total epochs (with --resume: a larger total extends the run)")
@click.option("--batch-size", type=int, default=128)
@click.option("--lr", type=float, default=5e-4, help="Adam learning rate")
@click.option("--lr-milestones", default=None, show_default=False,
              help="epochs where lr ×0.2, e.g. '50,60'  [default: the paper's 50,60 of 70, scaled to --epochs]")
@click.option("--warmup-epochs", type=int, default=1, help="clean-training epochs before the ε ramp")
@click.option("--ramp-epochs", type=int, default=None, show_default=False,
              help="epochs of the ε ramp  [default: 20/70 of --epochs]")
@click.option("--reg-weight", type=float, default=0.5, help="warm-up regulariser weight (×(1-ε_t/ε))")
@click.option("--l1", type=float, default=0.0, help="L1 weight penalty")
@click.option("--grad-clip", type=float, default=10.0, help="max gradient norm (0: off)")
@click.option("--relu-shrink", type=float, default=1.0,
              help="multiply unstable ReLUs' upper bounds by this during training (paper: 0.8; 1 = off; box only)")
@click.option("--train-samples", type=int, default=None, show_default=False,
              help="train on the first N images only  [default: all]")
@click.option("--eval-samples", type=int, default=1000, help="test images evaluated per epoch")
@click.option("--seed", type=int, default=0)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--out", "out_dir", default=None, show_default=False,
              help="run directory  [default: runs/<dataset>-<method>-<eps>-<model>]")
@click.option("--resume", "resume_dir", default=None, help="continue the run in this directory from its last checkpoint")
@click.option("--force", is_flag=True, help="replace the run already in --out (default: refuse)")
@click.option("--checkpoint-minutes", type=click.FloatRange(0), default=10.0,
              help="also checkpoint within an epoch every N minutes (0: only after each epoch)")
@click.option("--threads", type=click.IntRange(0), default=1,
              help="torch CPU threads; 0 = torch's default (all cores)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--ddp", is_flag=True,
              help="data-parallel over the processes of a torchrun launch (--batch-size is the global batch); "
                   "implied when torchrun started this process")
@click.pass_context
def train(ctx, method, method_option, domain, sabr_lambda, dataset, eps, model, epochs, batch_size, lr, lr_milestones, warmup_epochs,
          ramp_epochs, reg_weight, l1, grad_clip, relu_shrink, train_samples, eval_samples, seed, device, out_dir,
          resume_dir, force, checkpoint_minutes, threads, quiet, ddp):
    """Train a network for certified L∞ robustness with SABR (Müller et al., ICLR 2023).

    \b
    Examples:
      verikit train --dataset mnist --eps 0.1 --model cnn7                  # SABR, λ = 0.4
      verikit train --sabr-lambda 1 --model cnn-small --epochs 12           # IBP
      verikit train --sabr-lambda 0 --model cnn-small                       # PGD training
      verikit train --method standard --model mlp --epochs 5                # plain training
      verikit train --method mtl-ibp --method-option alpha=0.5 --model cnn-small  # MTL-IBP
      verikit train --method taps --eps 0.2 --model cnn7                   # TAPS (paper: train at 2x eps)
      verikit train --resume runs/mnist-sabr-0.1-cnn7                       # continue a run

      torchrun --nproc-per-node 2 -m verikit.train --model cnn7             # data parallel

    Writes config.json, metrics.csv, checkpoint.pt (every epoch, and mid-epoch when
    interrupted), curves.png and model.onnx into the run directory (rank 0 alone under torchrun).
    Exit codes: 0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM (a checkpoint is kept).
    """
    from .config import TrainConfig
    from .distributed import launched_by_torchrun, start, stop
    from .loop import CHECKPOINT, is_run_dir, read_checkpoint, resume_config

    dist = start(required=True, device=device) if ddp or launched_by_torchrun() else None
    try:
        _train(ctx, dist, **{k: v for k, v in locals().items() if k not in ("ctx", "dist", "ddp", "TrainConfig",
                                                                            "launched_by_torchrun", "start", "stop",
                                                                            "CHECKPOINT", "is_run_dir",
                                                                            "read_checkpoint", "resume_config")})
    finally:
        stop(dist)


def _train(ctx, dist, method, method_option, domain, sabr_lambda, dataset, eps, model, epochs, batch_size, lr, lr_milestones,
           warmup_epochs, ramp_epochs, reg_weight, l1, grad_clip, relu_shrink, train_samples, eval_samples, seed,
           device, out_dir, resume_dir, force, checkpoint_minutes, threads, quiet):
    from .config import TrainConfig
    from .loop import CHECKPOINT, is_run_dir, read_checkpoint, resume_config

    if resume_dir:
        fixed = [_flag(ctx, p.name) for p in ctx.command.params if p.name not in _RESUME_FLAGS and _given(ctx, p.name)]
        if fixed:
            raise VerikitError(f"{', '.join(fixed)} cannot change with --resume: the run continues with its saved "
                               f"configuration ({os.path.join(resume_dir, 'config.json')}); only --epochs, --device, "
                               "--threads, --checkpoint-minutes and --quiet may be given")
        if out_dir and os.path.abspath(out_dir) != os.path.abspath(resume_dir):
            raise VerikitError(f"--out {out_dir} differs from --resume {resume_dir}: a resumed run stays in its folder")
        cfg = resume_config(resume_dir)
        state = read_checkpoint(os.path.join(resume_dir, CHECKPOINT))  # a damaged file: an error before any work
        if _given(ctx, "epochs"):
            if epochs < int(state["epoch"]):
                raise VerikitError(f"--epochs {epochs}: the run in {resume_dir} has already done {state['epoch']}")
            cfg.epochs = epochs
        if _given(ctx, "device"):
            cfg.device = device
        cfg = cfg.resolved()
        out_dir = resume_dir
    else:
        state = None
        from .methods import get_method_class, parse_method_options

        method_cls = get_method_class(method)  # a typo: the list of registered methods, exit 2
        if not method_cls.uses_domain:
            unused = [_flag(ctx, n) for n in ("sabr_lambda", "domain", "relu_shrink") if _given(ctx, n)]
            if unused:
                raise VerikitError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to "
                                   f"--method {method} (plain training; --eps is still the evaluation radius)")
        cfg = TrainConfig(dataset=dataset, model=model, method=method, domain=domain, eps=_eps(eps),
                          method_options=parse_method_options(method_option),
                          sabr_lambda=sabr_lambda, epochs=epochs, batch_size=batch_size, lr=lr,
                          lr_milestones=_milestones(lr_milestones), warmup_epochs=warmup_epochs,
                          ramp_epochs=ramp_epochs, reg_weight=reg_weight, l1=l1, grad_clip=grad_clip,
                          relu_shrink=relu_shrink, seed=seed, device=device, train_samples=train_samples,
                          eval_samples=eval_samples)
        cfg = cfg.resolved()  # every bad flag fails here, before any data is loaded
        out_dir = out_dir or os.path.join("runs", f"{cfg.dataset}-{cfg.kind}-{cfg.eps:g}-{cfg.model}")
        check_output_dir(out_dir, "--out")
        if is_run_dir(out_dir) and not force:
            raise VerikitError(f"--out {out_dir} already holds a training run; continue it with --resume {out_dir} "
                               "or replace it with --force")
    check_output_dir(out_dir, "--resume" if resume_dir else "--out")
    main_rank = dist is None or dist.is_main
    echo = click.echo if main_rank else (lambda *a, **k: None)
    for w in cfg.schedule_warnings():
        echo(f"warning: {w}", err=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if dist is not None:
        dist.barrier()  # every rank has checked the flags and read the checkpoint before rank 0 writes
    trainer = None
    try:
        trainer = _start(cfg, out_dir, resume_dir, force, checkpoint_minutes, state, dist, echo)
        trainer.fit(progress=not quiet)
        if main_rank:
            finish_run(trainer)
        if dist is not None:
            # Every rank waits for rank 0's export before any destroys the process group: a gloo
            # rank that tore its group down while rank 0 was still working aborted at exit about
            # one run in five ("terminate called without an active exception", SIGABRT).
            dist.barrier()
    except KeyboardInterrupt as e:
        echo(_interrupted(e, trainer, out_dir, CHECKPOINT), err=True)
        sys.exit(exit_code(e))


def _start(cfg, out_dir, resume_dir, force, checkpoint_minutes, state, dist=None, echo=click.echo):
    from .loop import RUN_FILES, Trainer

    c = cfg
    echo(f"loading {c.dataset} and building {c.model}...", err=True)
    trainer = Trainer(cfg, out_dir, log=echo, dist=dist)
    trainer.checkpoint_seconds = 60.0 * checkpoint_minutes
    if resume_dir:
        trainer.restore(state)
        where = f"epoch {trainer.epoch}" if not trainer.partial else \
            f"step {trainer.partial['step']}/{trainer.steps_per_epoch} of epoch {trainer.epoch + 1}"
        echo(f"resuming {out_dir} after {where} (of {plural(trainer.cfg.epochs, 'epoch')})")
    elif force and trainer.is_main:
        for name in RUN_FILES:  # the old run's files, so nothing stale is left beside the new one
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    opts = ", ".join(f"{'λ' if k == 'lambda' else k}={v}" for k, v in c.method_options.items())
    what = (f"{c.kind} training (evaluated at ε={format_eps(c.eps)})" if not trainer.method.uses_domain else
            f"{c.kind} ({opts + ', ' if opts else ''}domain {c.domain}), ε={format_eps(c.eps)}")
    ranks = f" x {dist.world} ranks ({dist.backend})" if dist is not None else ""
    echo(f"training {c.model} on {c.dataset}: {what}, {plural(c.epochs, 'epoch')} (warm-up "
         f"{c.warmup_epochs}, ramp {c.ramp_epochs}, lr milestones {list(c.lr_milestones)}), "
         f"{plural(trainer.steps_per_epoch, 'step')} per epoch, device {trainer.device}{ranks} -> {out_dir}")
    return trainer


def _interrupted(e, trainer, out_dir, checkpoint) -> str:
    what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
    if not os.path.exists(os.path.join(out_dir, checkpoint)):
        return f"\n{what} before the first checkpoint; nothing to resume (start the run again)"
    if trainer is None:
        where = "before training started"
    elif trainer.partial:
        where = f"in epoch {trainer.epoch + 1} at step {trainer.partial['step']}/{trainer.steps_per_epoch}"
    elif trainer.epoch >= trainer.cfg.epochs:
        where = "after the last epoch, while exporting (the resume command just exports)"
    else:
        where = f"after epoch {trainer.epoch}"
    return (f"\n{what} {where}; the checkpoint in {out_dir} is kept; continue with:\n"
            f"  verikit train --resume {shlex.quote(out_dir)}")


def plural(n, word):
    from verikit.progress import plural as _plural

    return _plural(n, word)


def format_eps(eps):
    from verikit.eps import format_eps as _format

    return _format(eps)


def finish_run(trainer) -> None:
    """Plot the curves and export the final model to ONNX (checked with onnxruntime)."""
    from verikit.models.architectures import DATASET_SHAPES

    from .export import export_onnx
    from .plot import plot_metrics

    out = trainer.out_dir
    c = trainer.cfg
    plot_metrics(trainer.metrics, os.path.join(out, "curves.png"), f"{c.kind} {c.model} {c.dataset} ε={format_eps(c.eps)}")
    shape = DATASET_SHAPES[c.dataset][0]
    path = os.path.join(out, "model.onnx")
    diff = export_onnx(trainer.model, shape, path, trainer.xte[:16])
    last = trainer.metrics[-1] if trainer.metrics else {}
    click.echo(f"exported {path} (onnxruntime vs torch max difference {diff:.1e}); final: clean "
               f"{last.get('test_acc', float('nan')):.3f}, pgd {last.get('pgd_acc', float('nan')):.3f}, "
               f"box-certified {last.get('box_cert_acc', float('nan')):.3f}")
    chance = 1.0 / max(trainer.num_classes, 1)
    if last and last.get("test_acc", 1.0) <= 2 * chance:
        click.echo(f"warning: clean accuracy {last['test_acc']:.3f} is near chance ({chance:.2f}): the model has "
                   "collapsed (too few epochs or too short an eps ramp for this eps?); see the README's smoke-run "
                   "recipe", err=True)
    click.echo(f"certify it: verikit certify {shlex.quote(path)} --eps {format_eps(c.eps)}")
