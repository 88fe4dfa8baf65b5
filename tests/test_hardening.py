"""Issue 10, item by item (the bad-input table and the signal tests have their own modules):
silent or wrong results, vnncomp rows, consistent flags, progress, plug-in results, defaults in
--help, cosmetics. CliRunner in-process, and the installed console script where it matters."""
import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TEST_DATA
from verikit.cli import main
from verikit.domains import Domain, DomainResult, get_domain, register_domain
from verikit.domains.base import unregister_domain

TINY = os.path.join(TEST_DATA, "tiny_mnist_mlp.onnx")
HARD = os.path.join(TEST_DATA, "hard_milp_20x40x3.onnx")


def _run(*args, env=None):
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, [str(a) for a in args], env=env)
    finally:
        torch.set_num_threads(threads)


def _verikit():
    exe = os.path.join(os.path.dirname(sys.executable), "verikit")
    return exe if os.path.exists(exe) else shutil.which("verikit")


# ------------------------------------------------------------------ item 3 and 7: training flags
def test_train_eps_fraction_resume_extends_epochs_and_force_replaces(tmp_path):
    run = tmp_path / "run"
    base = ["train", "--method", "standard", "--model", "mlp", "--train-samples", "64", "--batch-size", "32",
            "--eval-samples", "16", "--quiet", "--out", run]
    first = _run(*base, "--epochs", "1", "--eps", "8/255")  # the same eps parser as certify
    assert first.exit_code == 0, first.output
    assert first.stderr.splitlines()[0].startswith("loading mnist")  # a first line at once, not after 45 s
    assert "1 epoch (" in first.stdout and "certify it: verikit certify" in first.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["eps"] == 8 / 255 and cfg["epochs"] == 1
    again = _run(*base, "--epochs", "1")
    assert again.exit_code == 2 and "--resume" in again.stderr and "--force" in again.stderr
    more = _run("train", "--resume", run, "--epochs", "2", "--quiet")  # --epochs is honoured, not ignored
    assert more.exit_code == 0, more.output
    assert "resuming" in more.stdout and "epoch 2:" in more.stdout
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    (run / "stale.txt").write_text("not part of a run: kept")
    forced = _run(*base, "--epochs", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # a fresh one-epoch run
    assert (run / "stale.txt").exists()


def test_short_schedules_warn_and_milestones_stay_distinct():
    from verikit.train.config import TrainConfig, scaled_milestones

    cfg = TrainConfig(epochs=4).resolved()
    assert len(set(cfg.lr_milestones)) == len(cfg.lr_milestones) and max(cfg.lr_milestones) < 4
    assert any("collapse" in w for w in cfg.schedule_warnings())
    assert not TrainConfig(epochs=70).resolved().schedule_warnings()
    assert scaled_milestones(70) == (50, 60) and scaled_milestones(12) == (9, 10)
    warned = TrainConfig(epochs=10, lr_milestones=(5, 5, 12)).resolved().schedule_warnings()
    assert any("more than once" in w for w in warned) and any("no effect" in w for w in warned)


# ------------------------------------------------------------------ item 6: vnncomp
def _instances(tmp_path, body, header="onnx,vnnlib,timeout_s,expected"):
    for name in ("test_sat.onnx", "test_unsat.onnx", "test_prop.vnnlib"):
        shutil.copy(os.path.join(TEST_DATA, name), tmp_path / name)
    path = tmp_path / "instances.csv"
    path.write_text((header + "\n" if header else "") + body)
    return path


def test_vnncomp_unsupported_model_is_an_error_row_and_the_run_goes_on(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Erf", ["h"], ["e"], name="ex"),
             helper.make_node("LogSoftmax", ["e"], ["y"], name="sm")]
    w = helper.make_tensor("w", TensorProto.FLOAT, [5, 5], np.eye(5, dtype=np.float32).ravel().tolist())
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "soft.onnx"))
    csv_path = _instances(tmp_path, "soft.onnx,test_prop.vnnlib,60,\ntest_sat.onnx,test_prop.vnnlib,60,sat\n"
                                    "test_unsat.onnx,test_prop.vnnlib,60,unsat\n")
    out = tmp_path / "r.csv"
    res = _run("vnncomp", csv_path, "-o", out, "--domains", "box,crown", "--threads", "1")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out)))
    assert [r["result"] for r in rows] == ["error", "violated", "holds"]
    assert "unsupported" in rows[0]["note"] and "Erf" in rows[0]["note"]
    assert [r["expected"] for r in rows] == ["", "violated", "holds"]  # sat/unsat in verikit's words
    assert [r["agrees"] for r in rows] == ["", "True", "True"]
    assert "3 instances: 1 holds, 1 violated, 0 unknown, 1 error; 2 of 2 answers checked against expected agree" \
        in res.stdout
    assert "error on soft.onnx" in res.stderr


def test_vnncomp_without_a_header_says_there_is_nothing_to_check(tmp_path):
    csv_path = _instances(tmp_path, "test_sat.onnx,test_prop.vnnlib,60\ntest_unsat.onnx,test_prop.vnnlib,60\n",
                          header=None)
    res = _run("vnncomp", csv_path, "-o", tmp_path / "r.csv", "--domains", "box,crown", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "no expected answers to check against" in res.stdout and "0 of 2" not in res.stdout


# ------------------------------------------------------------------ item 7: options from the command line
def test_domain_options_reach_every_domain_including_plugins(tmp_path):
    seen = {}

    @register_domain
    class Recorder(Domain):
        name, description = "recorder", "test plug-in: box bounds, records its options"
        options = {"level": 1, "label": "x", "strict": False}

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            seen.update(self.config)
            return get_domain("box").bound(graph, inputs, spec, store, ctx)

    try:
        res = _run("certify", TINY, "--eps", "0.001", "--num-samples", "2", "--domains", "recorder,crown", "--threads",
                   "1", "--domain-option", "recorder.level=3", "--domain-option", "recorder.label=abc",
                   "--domain-option", "recorder.strict=true", "--domain-option", "crown.alpha_lr=0.05",
                   "--alpha-steps", "2")
    finally:
        unregister_domain("recorder")
    assert res.exit_code == 0, res.output
    assert seen == {"level": 3, "label": "abc", "strict": True}


def test_milp_threads_zero_means_the_solvers_choice(tmp_path):
    res = _run("certify", TINY, "--eps", "0.03", "--num-samples", "3", "--domains", "box,milp", "--milp-threads", "0",
               "--milp-solver", "highs", "--threads", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"][0]["samples"] == 3


def test_python_dash_m_verikit_works():
    p = subprocess.run([sys.executable, "-m", "verikit", "domains"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "milp" in p.stdout and "crown" in p.stdout


# ------------------------------------------------------------------ item 8: progress, warnings
def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    data = tmp_path / "hard.npz"
    np.savez(data, x=np.full((1, 20), 0.5, np.float32), y=np.zeros(1, np.int64))
    res = _run("certify", HARD, "--dataset", data, "--eps", "0.5", "--domains", "box,milp", "--no-attack",
               "--milp-solver", "highs", "--timeout", "2", "--threads", "1",
               env={"VERIKIT_PROGRESS_INTERVAL": "0.3"})
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("certifying")]
    assert lines[0] == "certifying (box,milp): 1 samples"
    ticks = [ln for ln in lines if "elapsed" in ln]
    assert len(ticks) >= 3  # while the 2 s MILP runs, not only at the end
    assert ticks[-1].startswith("certifying (box,milp): 1/1 samples done (100%), 1 unknown")


def test_the_bar_moves_per_sample_on_a_terminal():
    import io

    from verikit.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with Progress(3, "certifying", stream=out) as bar:
        for k in range(3):
            bar.update(1, f"{k + 1} verified")
            assert f"{k + 1}/3 {k + 1} verified" in out.getvalue().split("\r")[-1]
        bar.echo("warning: a note")
    text = out.getvalue()
    assert "warning: a note\n" in text and text.endswith("\n")


def test_a_solver_warning_is_one_clean_line(tmp_path, monkeypatch):
    """Gurobi's size-limited licence refuses this MILP (700 binaries); the fallback warning
    must be one `warning:` line, not Python's two-line warning with a source line."""
    from verikit.domains import milp_solvers

    pytest.importorskip("gurobipy")
    monkeypatch.setattr(milp_solvers, "_GUROBI_REFUSED_SIZE", None)
    monkeypatch.setattr(milp_solvers, "_GUROBI_WARNED", False)
    n = 700
    net = torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.ReLU(), torch.nn.Linear(n, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(n))
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].weight[0].fill_(1.0)
        net[2].bias.copy_(torch.tensor([-0.5, 0.0]))  # class 1 at x = 0; y1 - y0 = 0.5 - sum relu(x) < 0 at x = 1
    model = tmp_path / "wide.onnx"
    torch.onnx.export(net, torch.zeros(1, n), str(model), dynamo=False)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((1, n), np.float32), y=np.ones(1, np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        res = _run("certify", model, "--dataset", data, "--eps", "1", "--data-range", "-1,1", "--domains", "milp",
                   "--no-attack", "--milp-solver", "gurobi", "--threads", "1", "--domain-option", "milp.bounds_from=none")
    assert res.exit_code == 0, res.output
    assert "1 falsified" in res.stderr  # the MILP ran (with HiGHS) and found the counterexample
    lines = res.stderr.splitlines()
    hits = [ln for ln in lines if "gurobi refused" in ln]
    assert len(hits) == 1 and hits[0].startswith("warning: gurobi refused the model")
    assert not any("warnings.warn" in ln or "RuntimeWarning" in ln for ln in lines)


# ------------------------------------------------------------------ item 9: defaults in --help
@pytest.mark.parametrize("command", ["certify", "vnncomp", "train", "info", "models", "domains"])
def test_every_option_shows_its_default(command):
    import click

    from verikit.cli import main as group

    cmd = group.get_command(None, command)
    ctx = click.Context(cmd, info_name=command, show_default=True)
    missing = []
    for p in cmd.params:  # options with a default value (flags off by default need none)
        if not isinstance(p, click.Option) or p.is_flag and not p.secondary_opts or p.name == "help":
            continue
        if (p.multiple or p.default is None) and "default" not in (p.help or ""):
            continue  # nothing to show (--output, --vnnlib, ...)
        record = p.get_help_record(ctx)
        if record and "default" not in record[1]:
            missing.append(p.opts[0])
    assert not missing, f"{command}: no default shown for {missing}"
    threads = next((p for p in cmd.params if p.name == "threads"), None)
    assert threads is None or threads.default == 1


# ------------------------------------------------------------------ item 10: plug-in results
class _Broken(Domain):
    name, description = "broken", "test plug-in returning a bad result"
    mode = "shape"

    def bound(self, graph, inputs, spec=None, store=None, ctx=None):
        res = get_domain("box").bound(graph, inputs, spec, store, ctx)
        B = inputs.lo.shape[0]
        if _Broken.mode == "shape":
            return DomainResult(res.lower[:, :3], None, res.store)  # 3 of 9 rows
        if _Broken.mode == "type":
            return res.lower
        return DomainResult(torch.full_like(res.lower, -1.0), None, res.store, status=["verified"] * B)


@pytest.mark.parametrize("mode,message", [("shape", "result.lower has shape (5, 3), expected (5, 9)"),
                                          ("type", "it returned Tensor, not a DomainResult")])
def test_a_plugin_returning_the_wrong_thing_is_one_clear_error(mode, message, monkeypatch):
    monkeypatch.setattr(_Broken, "mode", mode)
    register_domain(_Broken)
    try:
        res = _run("certify", TINY, "--eps", "0.001", "--num-samples", "5", "--domains", "broken", "--no-attack",
                   "--threads", "1", "--quiet")
    finally:
        unregister_domain("broken")
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: domain 'broken' failed on this model: ")
    assert message in res.stderr and "Traceback" not in res.output


def test_an_incomplete_plugins_unbacked_verified_is_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setattr(_Broken, "mode", "claims")
    register_domain(_Broken)
    out = tmp_path / "r.jsonl"
    try:
        res = _run("certify", TINY, "--eps", "0.001", "--num-samples", "5", "--domains", "broken", "--no-attack",
                   "--threads", "1", "-o", out)
    finally:
        unregister_domain("broken")
    assert res.exit_code == 0, res.output
    from verikit.certify.records import read_records

    assert all(r["status"] != "verified" for r in read_records(str(out)))
    assert "warning: domain 'broken' (not complete) said verified" in res.stderr


def test_finished_samples_are_reported_before_the_slow_stage_runs():
    """The chain's per-sample callback: samples box proves are handed out before the
    one-sample-at-a-time stage starts on the others."""
    import verikit
    from verikit.certify import Chain, ChainConfig
    from verikit.datasets import load_mnist

    reported, order = [], []

    @register_domain
    class Slow(Domain):
        name, description, complete = "slowtest", "test: per-sample stage", True
        options = {"time_limit": 10.0}

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            order.append(list(reported))
            res = get_domain("box").bound(graph, inputs, spec, store, ctx)
            return DomainResult(res.lower, res.upper, res.store, status=["unknown"] * inputs.lo.shape[0])

    try:
        graph = verikit.from_onnx(TINY)
        x, y = load_mnist("test")
        x, y = x[:6].reshape((6,) + graph.input_shape), y[:6]
        chain = Chain(graph, ChainConfig(domains=["box", "slowtest"], attack=False))
        out = chain.run(verikit.Box.linf_ball(x, 0.001), verikit.Spec.robustness(y, 10),
                        on_outcome=lambda i, o: reported.append(i))
    finally:
        unregister_domain("slowtest")
    by_box = [i for i, o in enumerate(out) if o.by == "box"]
    assert by_box and len(order) == 6 - len(by_box)
    assert all(set(by_box) <= set(seen) for seen in order)  # before the first slow call already
    assert sorted(reported) == list(range(6)) and len(reported) == 6


# ------------------------------------------------------------------ item 11: cosmetics
def test_singular_words_and_plain_eps_labels():
    from verikit.certify.report import format_summary, summarize
    from verikit.errors import UnsupportedOpsError

    rec = {"index": 0, "eps": 0.2, "status": "unknown", "by": None, "label": 0, "prediction": 0, "margin": None,
           "time": 0.1, "times": {}, "note": ""}
    text = format_summary(summarize([rec], ["box"]))
    assert text.startswith("eps = 0.2: 1 sample, 1 correctly classified") and "51/255" not in text
    assert "(1 node):" in str(UnsupportedOpsError([("a", "Exp", "")]))


@pytest.mark.parametrize("which", ["sweep", "curves"])
def test_legends_do_not_cover_the_data(which, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    if which == "sweep":
        from verikit.certify.report import plot_sweep, summarize

        recs = [{"index": i, "eps": e, "status": "verified" if i < 5 else "unknown", "by": "box" if i < 5 else None,
                 "label": 0, "prediction": 0, "margin": None, "time": 0.1, "times": {}, "note": ""}
                for e in (0.01, 0.02) for i in range(10)]
        plot_sweep(summarize(recs, ["box"]), str(tmp_path / "s.png"))
    else:
        from verikit.train.plot import plot_metrics

        rows = [{"epoch": e, "loss": 1.0 / e, "eps": 0.1, "test_acc": 0.9, "pgd_acc": 0.8, "box_cert_acc": 0.7}
                for e in (1, 2, 3)]
        plot_metrics(rows, str(tmp_path / "c.png"))
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for ax, leg in legends:
        box, area = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.y1 <= area.y0 + 1, "legend overlaps its axes"


# ------------------------------------------------------------------ item 5: mid-epoch checkpoints
def test_periodic_mid_epoch_checkpoints_resume_bit_identically(tmp_path, monkeypatch):
    """With a checkpoint after every step, a copy taken mid-epoch resumes to exactly the
    uninterrupted weights; and the end-of-epoch checkpoint carries no stale mid-epoch state."""
    from verikit.models import architectures
    from verikit.train.config import TrainConfig
    from verikit.train.loop import Trainer, read_checkpoint

    def tiny(in_shape, num_classes):
        return [torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes)]

    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny-mlp", tiny)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (96,), generator=g)
    x = (torch.rand(96, 1, 28, 28, generator=g) * 0.3 + (y.float() / 10).view(-1, 1, 1, 1) * 0.7).clamp(0, 1)
    data = (x, y, x[:16], y[:16])
    cfg = TrainConfig(model="tiny-mlp", eps=0.1, sabr_lambda=0.4, epochs=2, batch_size=16, eval_samples=16,
                      warmup_epochs=0, ramp_epochs=1, seed=1)
    straight = Trainer(cfg, str(tmp_path / "a"), data=data, log=lambda s: None)
    straight.fit(progress=False)

    run = tmp_path / "b"
    t = Trainer(cfg, str(run), data=data, log=lambda s: None)
    t.checkpoint_seconds = 1e-9  # after every step
    saved = []
    real_save = Trainer.save_checkpoint

    def save_and_copy(self):
        real_save(self)
        saved.append(self.partial and self.partial["step"])
        if len(saved) == 9:  # epoch 2, after its 2nd step (epoch 1: 5 mid-epoch saves + 1 at its end)
            shutil.copy(run / "checkpoint.pt", tmp_path / "mid.pt")

    monkeypatch.setattr(Trainer, "save_checkpoint", save_and_copy)
    t.fit(progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    assert saved[:6] == [1, 2, 3, 4, 5, None] and read_checkpoint(str(run / "checkpoint.pt"))["partial"] is None
    mid = read_checkpoint(str(tmp_path / "mid.pt"))
    assert mid["epoch"] == 1 and mid["partial"]["step"] == 3
    resumed = Trainer(cfg, str(tmp_path / "c"), data=data, log=lambda s: None)
    resumed.restore(mid)
    torch.manual_seed(999)  # the global RNG state at resume time must not matter
    resumed.fit(progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in straight.metrics]


def test_atomic_writes_keep_the_old_file_and_respect_links_and_devices(tmp_path):
    from verikit.outputs import atomic_write

    target = tmp_path / "result.txt"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(target)) as f:
            f.write("half of the new")
            raise KeyboardInterrupt  # killed mid-write
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["result.txt"]  # no temp file left
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with atomic_write(str(link)) as f:
        f.write("new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    with atomic_write(os.devnull) as f:  # a device is written, not replaced by a regular file
        f.write("x")
    assert not os.path.isfile(os.devnull)
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # plain-open permissions, not mkstemp's
