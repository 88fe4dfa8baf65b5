"""The training-method registry: the SABR family as registry methods trains bit-identically to
the trainer's code before the registry (same run, same CPU), and the registry's plumbing
(listing, typos, options, plug-ins) behaves like the domain registry's."""
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from verikit import ir
from verikit.errors import VerikitError
from verikit.models import architectures
from verikit.train.config import TrainConfig
from verikit.train.loop import Trainer, _update_running_stats
from verikit.train.losses import certified_loss, l1_penalty, warmup_regularizer
from verikit.train.methods import (MethodOption, StepInputs, StepLoss, TrainingMethod, available_methods,
                                   get_method, parse_method_options, register_method, unregister_method)
from verikit.train.sabr import select_region

from test_train_bitwise import _data, tiny_bn

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def pre_registry_loss_on_batch(self, x, y, eps, epoch, gen=None, shard=None):
    """Trainer.loss_on_batch as it was before the registry (commit 852c644 of main; the single-
    process path, where the data-parallel share is 1): the reference the registry path must
    reproduce bit for bit."""
    assert shard is None
    cfg = self.cfg
    self.model.train()
    if cfg.method == "standard" or eps == 0:
        loss = F.cross_entropy(self.model(x), y)
        cert = float("nan")
    else:
        region = select_region(self.model, x, y, eps, cfg.sabr_lambda, cfg.data_range, gen)
        ctx = None
        if self.has_bn:
            ctx = ir.EvalContext(bn_mode="batch")
            self.train_graph.forward(x, ctx=ctx)
            if self.bn_pairs is not None:
                _update_running_stats(self.bn_pairs, ctx, x.shape[0])
            else:
                with torch.no_grad():
                    self.model(x)
        cl = certified_loss(self.train_graph, self.domain, region, y, self.num_classes, ctx)
        loss = cl.loss
        if self.eps_at.in_ramp(epoch) and cfg.reg_weight > 0 and eps < cfg.eps:
            reg = warmup_regularizer(self.train_graph, cl.store, region)
            loss = loss + cfg.reg_weight * (1 - eps / cfg.eps) * reg
        others = torch.ones_like(cl.lower, dtype=torch.bool).scatter_(1, y[:, None], False)
        cert = float(((cl.lower > 0) | ~others).all(1).float().mean())
    if cfg.l1 > 0:
        loss = loss + cfg.l1 * l1_penalty(self.model)
    return loss, cert


def _train(model, method, lam, old: bool, l1=0.0):
    added = model not in architectures.ARCHITECTURES
    if added:
        architectures.ARCHITECTURES[model] = tiny_bn
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(model=model, dataset="mnist", eps=0.1, method=method, sabr_lambda=lam, epochs=12,
                          batch_size=32, warmup_epochs=1, ramp_epochs=3, eval_samples=16, seed=0, l1=l1)
        tr = Trainer(cfg, "/tmp/verikit-methods-unused", data=_data(), log=lambda s: None)
        if old:
            tr.loss_on_batch = types.MethodType(pre_registry_loss_on_batch, tr)
        gen = torch.Generator().manual_seed(7)
        certs = []
        for step, eps in enumerate((0.0, 0.02, 0.03)):  # a warm-up step, then two ramp steps (regulariser on)
            idx = slice(32 * step, 32 * (step + 1))
            certs.append(tr.step(tr.xtr[idx], tr.ytr[idx], eps, 0 if eps == 0 else 1, gen))
        return tr.model.state_dict(), certs
    finally:
        torch.set_num_threads(threads)
        if added:
            del architectures.ARCHITECTURES[model]


CASES = [("cnn-small", "sabr", 0.4, 0.0), ("cnn-small", "ibp", None, 0.0), ("cnn-small", "pgd", None, 0.0),
         ("cnn-small", "standard", None, 1e-5), ("tiny-bn", "sabr", 0.4, 0.0), ("tiny-bn", "ibp", None, 1e-5)]


@pytest.mark.parametrize("model,method,lam,l1", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_registry_path_is_bit_identical_to_the_pre_registry_trainer(model, method, lam, l1):
    new, new_certs = _train(model, method, lam, old=False, l1=l1)
    # the old trainer knew only sabr (λ = 1: IBP, λ = 0: PGD) and standard
    old_method, old_lam = {"ibp": ("sabr", 1.0), "pgd": ("sabr", 0.0)}.get(method, (method, lam))
    old, old_certs = _train(model, old_method, old_lam, old=True, l1=l1)
    assert sorted(new) == sorted(old)
    for k in new:
        assert torch.equal(new[k], old[k]), k
    assert [str(c) for c in new_certs] == [str(c) for c in old_certs]  # losses and fractions, nan included


def test_old_configs_still_mean_what_they_meant():
    """config.json files written before the registry (no method_options) resume as before."""
    old = {"method": "sabr", "sabr_lambda": 1.0, "eps": 0.1, "model": "cnn-small"}
    c = TrainConfig.from_dict(old).resolved()
    assert c.kind == "ibp" and c.method_options == {"lambda": 1.0}
    assert TrainConfig.from_dict({"method": "sabr", "eps": 0.3}).resolved().method_options == {"lambda": 0.6}
    assert TrainConfig.from_dict({"method": "standard"}).resolved().kind == "standard"
    again = TrainConfig.from_dict(c.to_dict()).resolved()  # a resolved config resolves to itself
    assert again == c


def test_every_builtin_method_is_listed():
    names = set(available_methods())
    assert {"standard", "sabr", "ibp", "pgd", "mtl-ibp", "exp-ibp", "cc-ibp", "crown-ibp"} <= names
    for cls in available_methods().values():
        assert cls.description and all(isinstance(o, MethodOption) for o in cls.options.values())


def test_options_defaults_paper_values_and_bad_values():
    assert get_method("sabr", "mnist", 0.3).config["lambda"] == 0.6  # paper Table 6
    assert get_method("sabr", "mnist", 0.3, **{"lambda": "0.25"}).config["lambda"] == 0.25
    assert get_method("mtl-ibp", "mnist", 0.3).config["alpha"] == 0.5  # CTBench's MNIST 0.3 script
    assert get_method("mtl-ibp", "mnist", 0.1, alpha="0.2", attack_steps="3").config == {"alpha": 0.2,
                                                                                          "attack_steps": 3}
    for bad, msg in ((dict(alpha="x"), "must be a float"), (dict(alpha=1.5), r"\[0, 1\]"),
                     (dict(alhpa=0.1), "no option"), (dict(attack_steps="1.5"), "must be a int")):
        with pytest.raises(VerikitError, match=msg):
            get_method("mtl-ibp", **bad)
    assert parse_method_options(["alpha=0.3", "attack-steps=2"]) == {"alpha": "0.3", "attack_steps": "2"}
    with pytest.raises(VerikitError, match="NAME=VALUE"):
        parse_method_options(["alpha"])


def test_sabr_lambda_flag_and_method_option_agree_or_fail():
    c = TrainConfig(method="sabr", method_options={"lambda": "0.2"}).resolved()
    assert c.sabr_lambda == 0.2 and c.kind == "sabr"
    with pytest.raises(VerikitError, match="disagree"):
        TrainConfig(method="sabr", sabr_lambda=0.3, method_options={"lambda": 0.2}).resolved()
    with pytest.raises(VerikitError, match="sabr only"):
        TrainConfig(method="mtl-ibp", sabr_lambda=0.3).resolved()
    with pytest.raises(VerikitError, match="unknown training method 'mtl_ibp'; available: .*mtl-ibp"):
        TrainConfig(method="mtl_ibp").resolved()


class _Halved(TrainingMethod):
    name = "halved-ibp"
    description = "half the IBP loss (test method)"
    options = {"scale": MethodOption(0.5, "loss factor")}

    def loss(self, step: StepInputs) -> StepLoss:
        from verikit.bounds import Box

        ball = Box.linf_ball(step.x, step.eps)
        cl = certified_loss(step.trainer.train_graph, step.trainer.domain, ball, step.y, step.trainer.num_classes)
        return StepLoss(self.config["scale"] * cl.loss, cl.lower, cl.store, ball)


def test_decorated_method_trains_through_the_loop():
    register_method(_Halved)
    try:
        cfg = TrainConfig(model="mlp", method="halved-ibp", method_options={"scale": "0.25"}, epochs=2,
                          batch_size=32, eval_samples=16, warmup_epochs=0, ramp_epochs=0)
        tr = Trainer(cfg, "/tmp/verikit-methods-unused", data=_data(64), log=lambda s: None)
        loss, cert = tr.loss_on_batch(tr.xtr[:32], tr.ytr[:32], 0.1, 1)
        ibp = get_method("ibp")
        ref = ibp.loss(StepInputs(tr, tr.xtr[:32], tr.ytr[:32], 0.1, 0.1, 1)).loss
        assert torch.equal(loss, 0.25 * ref)
        assert 0.0 <= cert <= 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_method(type("Other", (_Halved,), {}))
    finally:
        unregister_method("halved-ibp")


def _cli(args, monkeypatch=None, plugins=None):
    """`verikit ARGS` in-process (a subprocess costs ~30 s of imports on a loaded machine)."""
    from click.testing import CliRunner

    from verikit.cli import main

    if plugins:
        import verikit.domains.base as dbase
        import verikit.train.methods as mbase

        monkeypatch.syspath_prepend(EXAMPLES)
        monkeypatch.setenv("VERIKIT_PLUGINS", plugins)
        monkeypatch.setattr(dbase, "_ENTRY_POINTS_LOADED", False)  # read VERIKIT_PLUGINS again
        monkeypatch.setattr(mbase, "_LOADED", False)
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)


def test_methods_command_and_typos():
    out = _cli(["methods", "--options"])
    assert out.exit_code == 0, out.output
    for name in ("sabr", "mtl-ibp", "crown-ibp", "Müller", "De Palma", "Zhang"):
        assert name in out.stdout
    for args, msg in ((["--method", "sabrr"], "error: unknown training method 'sabrr'; available: cc-ibp, "),
                      (["--method", "mtl-ibp", "--method-option", "alpha=2"], "alpha must lie in [0, 1]"),
                      (["--method", "mtl-ibp", "--method-option", "alpha"], "must be NAME=VALUE"),
                      (["--method", "standard", "--sabr-lambda", "0.2"], "--sabr-lambda")):
        bad = _cli(["train", *args])
        lines = bad.stderr.splitlines()
        assert bad.exit_code == 2 and len(lines) == 1 and msg in lines[0], (args, bad.output)


def test_example_plugin_method_is_resolved_by_the_cli(monkeypatch):
    try:
        bad = _cli(["train", "--method", "clean-ibp", "--method-option", "kapa=1"], monkeypatch, "clean_ibp_method")
        assert bad.exit_code == 2 and "method 'clean-ibp' has no option(s) kapa (known: kappa)" in bad.stderr
    finally:
        unregister_method("clean-ibp")
        sys.modules.pop("clean_ibp_method", None)


@pytest.mark.slow  # ~40 s on the loaded 2-core machine (loads MNIST, trains, exports)
def test_example_plugin_method_trains_from_the_cli(tmp_path, monkeypatch):
    import json

    try:
        out = _cli(["methods"], monkeypatch, "clean_ibp_method")
        assert out.exit_code == 0, out.output
        assert "clean-ibp" in out.stdout and "example plug-in" in out.stdout
        run = _cli(["train", "--method", "clean-ibp", "--method-option", "kappa=0.3", "--model", "mlp",
                    "--epochs", "2", "--train-samples", "64", "--eval-samples", "16", "--warmup-epochs", "0",
                    "--quiet", "--out", str(tmp_path / "run")], monkeypatch, "clean_ibp_method")
        assert run.exit_code == 0, run.output
        cfg = json.loads((tmp_path / "run" / "config.json").read_text())
        assert cfg["method"] == "clean-ibp" and cfg["method_options"] == {"kappa": 0.3}
        assert (tmp_path / "run" / "model.onnx").exists()
        metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
        assert len(metrics) == 3 and metrics[1].split(",")[1] == "clean-ibp"
    finally:
        unregister_method("clean-ibp")
        sys.modules.pop("clean_ibp_method", None)
