"""`verikit train`: certified training (SABR; λ=1 IBP, λ=0 PGD) or standard training."""
from __future__ import annotations

import os

import click

from verikit.errors import VerikitError


def _milestones(text):
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise VerikitError(f"--lr-milestones must be comma-separated epochs, got {text!r}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--method", type=click.Choice(["sabr", "standard"]), default="sabr", show_default=True,
              help="sabr: certified training (--sabr-lambda 1 = IBP, 0 = PGD training); standard: plain training")
@click.option("--domain", default="box", show_default=True, help="registered differentiable domain propagating the region")
@click.option("--sabr-lambda", type=float, default=None,
              help="small-box size λ in [0, 1] (default: the paper's value for dataset/eps, else 0.4)")
@click.option("--dataset", default="mnist", show_default=True, help="mnist (bundled), fashion-mnist, cifar10 (downloaded)")
@click.option("--eps", type=float, default=0.1, show_default=True, help="target L∞ radius (in [0, 1] pixel units)")
@click.option("--model", default="cnn7", show_default=True, help="cnn7, cnn-small or mlp")
@click.option("--epochs", type=int, default=70, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Adam learning rate")
@click.option("--lr-milestones", default=None, help="epochs where lr ×0.2, e.g. '50,60' (default: paper's, scaled)")
@click.option("--warmup-epochs", type=int, default=1, show_default=True, help="clean-training epochs before the ε ramp")
@click.option("--ramp-epochs", type=int, default=None, help="epochs of the ε ramp (default: 20/70 of --epochs)")
@click.option("--reg-weight", type=float, default=0.5, show_default=True, help="warm-up regulariser weight (×(1-ε_t/ε))")
@click.option("--l1", type=float, default=0.0, show_default=True, help="L1 weight penalty")
@click.option("--grad-clip", type=float, default=10.0, show_default=True, help="max gradient norm (0: off)")
@click.option("--relu-shrink", type=float, default=1.0, show_default=True,
              help="multiply unstable ReLUs' upper bounds by this during training (paper: 0.8; 1 = off; box only)")
@click.option("--train-samples", type=int, default=None, help="train on the first N images only")
@click.option("--eval-samples", type=int, default=1000, show_default=True, help="test images evaluated per epoch")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", "out_dir", default=None, help="run directory (default: runs/<dataset>-<method>-<eps>-<model>)")
@click.option("--resume", "resume_dir", default=None, help="continue the run in this directory from its last checkpoint")
@click.option("--threads", type=int, default=None, help="CPU threads for torch")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train(method, domain, sabr_lambda, dataset, eps, model, epochs, batch_size, lr, lr_milestones, warmup_epochs,
          ramp_epochs, reg_weight, l1, grad_clip, relu_shrink, train_samples, eval_samples, seed, device, out_dir,
          resume_dir, threads, quiet):
    """Train a network for certified L∞ robustness with SABR (Müller et al., ICLR 2023).

    \b
    Examples:
      verikit train --dataset mnist --eps 0.1 --model cnn7                  # SABR, λ = 0.4
      verikit train --sabr-lambda 1 --model cnn-small --epochs 12           # IBP
      verikit train --sabr-lambda 0 --model cnn-small                       # PGD training
      verikit train --method standard --model mlp --epochs 5                # plain training
      verikit train --resume runs/mnist-sabr-0.1-cnn7                       # continue a run

    Writes config.json, metrics.csv, checkpoint.pt (every epoch), curves.png and model.onnx
    into the run directory.
    """
    import torch

    from .config import TrainConfig
    from .loop import Trainer, resume_config

    if threads:
        torch.set_num_threads(threads)
    if resume_dir:
        cfg = resume_config(resume_dir)
        out_dir = resume_dir
    else:
        cfg = TrainConfig(dataset=dataset, model=model, method=method, domain=domain, eps=eps, sabr_lambda=sabr_lambda,
                          epochs=epochs, batch_size=batch_size, lr=lr, lr_milestones=_milestones(lr_milestones),
                          warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs, reg_weight=reg_weight, l1=l1,
                          grad_clip=grad_clip, relu_shrink=relu_shrink, seed=seed, device=device,
                          train_samples=train_samples, eval_samples=eval_samples)
        cfg = cfg.resolved()  # every bad flag fails here, before any data is loaded
        out_dir = out_dir or os.path.join("runs", f"{dataset}-{cfg.kind}-{eps:g}-{model}")
    trainer = Trainer(cfg, out_dir, log=click.echo)
    if resume_dir:
        from .loop import CHECKPOINT

        trainer.load_checkpoint(os.path.join(resume_dir, CHECKPOINT))
        click.echo(f"resuming {out_dir} after epoch {trainer.epoch}/{trainer.cfg.epochs}")
    c = trainer.cfg
    click.echo(f"training {c.model} on {c.dataset}: {c.kind} (λ={c.sabr_lambda}, domain {c.domain}), ε={c.eps}, "
               f"{c.epochs} epochs (warm-up {c.warmup_epochs}, ramp {c.ramp_epochs}, lr milestones "
               f"{list(c.lr_milestones)}), device {trainer.device} -> {out_dir}")
    try:
        trainer.fit(progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted after epoch {trainer.epoch}; continue with: verikit train --resume {out_dir}", err=True)
        raise SystemExit(130)
    finish_run(trainer)


def finish_run(trainer) -> None:
    """Plot the curves and export the final model to ONNX (checked with onnxruntime)."""
    from verikit.models.architectures import DATASET_SHAPES

    from .export import export_onnx
    from .plot import plot_metrics

    out = trainer.out_dir
    c = trainer.cfg
    plot_metrics(trainer.metrics, os.path.join(out, "curves.png"), f"{c.kind} {c.model} {c.dataset} ε={c.eps}")
    shape = DATASET_SHAPES[c.dataset][0]
    path = os.path.join(out, "model.onnx")
    diff = export_onnx(trainer.model, shape, path, trainer.xte[:16])
    last = trainer.metrics[-1] if trainer.metrics else {}
    click.echo(f"exported {path} (onnxruntime vs torch max difference {diff:.1e}); final: clean "
               f"{last.get('test_acc', float('nan')):.3f}, pgd {last.get('pgd_acc', float('nan')):.3f}, "
               f"box-certified {last.get('box_cert_acc', float('nan')):.3f}")
    click.echo(f"certify it: verikit certify {path} --eps {c.eps}")
