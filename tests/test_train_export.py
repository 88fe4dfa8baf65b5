"""ONNX export of trained models: onnxruntime and verikit's importer agree with torch, and a
whole `verikit train` run writes every promised file."""
import csv
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import verikit
from verikit.cli import main
from verikit.errors import VerikitError
from verikit.models.architectures import build_model
from verikit.train.export import export_onnx


@pytest.mark.parametrize("arch, dataset", [("cnn-small", "mnist"), ("mlp", "mnist"), ("cnn-small", "cifar10")])
def test_export_matches_torch(tmp_path, arch, dataset):
    torch.manual_seed(0)
    model = build_model(arch, dataset)
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    path = str(tmp_path / "m.onnx")
    export_onnx(model, shape, path)
    x = torch.rand((5,) + shape)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]  # a batch of 5: dynamic batch axis
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4
    graph = verikit.from_onnx(path)
    assert torch.allclose(graph.forward(x), torch.from_numpy(ref), atol=1e-4)


def test_export_with_batchnorm_uses_running_statistics(tmp_path):
    import torch.nn as nn

    from verikit.models.architectures import Normalize

    torch.manual_seed(1)
    model = nn.Sequential(Normalize(0.1307, 0.3081), nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 14 * 14, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from their initial values
            model(torch.rand(16, 1, 28, 28) * 0.5 + 0.2)
    path = str(tmp_path / "bn.onnx")
    export_onnx(model, (1, 28, 28), path)
    x = torch.rand(2, 1, 28, 28)
    graph = verikit.from_onnx(path)
    with torch.no_grad():
        ref = model.eval()(x)
        train_mode = model.train()(x)
    assert torch.allclose(graph.forward(x), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(train_mode, ref, atol=1e-3)  # the check above can tell the two apart


def test_export_detects_disagreement(tmp_path, monkeypatch):
    import verikit.onnx_check as oc

    model = build_model("mlp", "mnist")
    monkeypatch.setattr(oc, "evaluate_with_onnxruntime", lambda path, x, graph=None: np.zeros((x.shape[0], 10)) + 5.0)
    with pytest.raises(VerikitError, match="disagrees"):
        export_onnx(model, (1, 28, 28), str(tmp_path / "bad.onnx"))


def test_train_cli_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", "mlp", "--sabr-lambda", "0.4", "--eps", "0.1",
                                    "--epochs", "2", "--train-samples", "128", "--eval-samples", "32",
                                    "--batch-size", "64", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    for f in ("config.json", "metrics.csv", "checkpoint.pt", "curves.png", "model.onnx"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sabr_lambda"] == 0.4 and cfg["eps"] == 0.1 and cfg["epochs"] == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"loss", "test_acc", "pgd_acc", "box_cert_acc", "eps", "lambda", "time_s"} <= set(rows[0])
    assert float(rows[0]["eps"]) == 0.0 and float(rows[1]["eps"]) == pytest.approx(0.1)  # warm-up, then ramp
    # resuming a finished run trains nothing more and re-exports the same model
    before = (out / "model.onnx").read_bytes()
    res2 = CliRunner().invoke(main, ["train", "--resume", str(out), "--quiet"])
    assert res2.exit_code == 0, res2.output
    assert "resuming" in res2.output
    graph = verikit.from_onnx(str(out / "model.onnx"))
    x = torch.rand(3, 1, 28, 28)
    old = tmp_path / "old.onnx"
    old.write_bytes(before)
    assert torch.equal(graph.forward(x), verikit.from_onnx(str(old)).forward(x))
