"""Reference architectures and the shipped model zoo."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

import verikit
from verikit.cli import main
from verikit.models.architectures import ARCHITECTURES, build_model
from verikit.models.zoo import list_models, shipped_model_path


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("dataset, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_architectures_import_exactly(arch, dataset, shape):
    model = build_model(arch, dataset).eval()
    graph = verikit.from_torch(model, shape)
    x = torch.rand((2,) + shape)
    with torch.no_grad():
        assert torch.allclose(graph.forward(x), model(x), atol=1e-5)
    assert model(x).shape == (2, 10)


def test_normalisation_layer_is_frozen_and_correct():
    model = build_model("cnn-small", "cifar10")
    norm = model[0]
    assert not any(p.requires_grad for p in norm.parameters())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), (x - mean) / std, atol=1e-5)


def test_unknown_names():
    from verikit.errors import VerikitError

    with pytest.raises(VerikitError, match="unknown model"):
        build_model("nope")
    assert shipped_model_path("no-such-model") is None
    assert shipped_model_path("../../etc/passwd") is None


SHIPPED = ["mnist-sabr-0.1", "mnist-ibp-0.1"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_is_accurate(name):
    path = shipped_model_path(name)
    assert path is not None and path == shipped_model_path(name + ".onnx")
    assert os.path.getsize(path) < 600 * 1024
    meta = json.loads(open(path[:-5] + ".json").read())
    assert meta["name"] == name and meta["eps"] == 0.1
    graph = verikit.from_onnx(path)
    from verikit.datasets import load_mnist

    x, y = load_mnist("test")
    with torch.no_grad():
        acc = float((graph.forward(x[:500]).argmax(1) == y[:500]).float().mean())
    assert acc > 0.9
    assert abs(acc - meta["clean_acc_first500"]) < 1e-9  # the metadata was measured on this file


def test_models_command_lists_shipped():
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    listed = {m["name"] for m in list_models()}
    for name in SHIPPED:
        assert name in listed and name in res.output


CAMPAIGN_SHIPPED = ["mnist-mtl-ibp-0.1", "mnist-pgd-0.1", "mnist-taps-0.1", "mnist-staps-0.1", "mnist-ibp-0.3",
                    "mnist-sabr-0.3"]


@pytest.mark.parametrize("name", CAMPAIGN_SHIPPED)
def test_campaign_models_match_their_records(name):
    """Shipped campaign models: the file loads, its clean accuracy is the metadata's, and the
    metadata's figures are those of the committed campaign record it names."""
    from verikit.datasets import load_mnist
    from verikit.train.methods import available_methods

    path = shipped_model_path(name)
    assert path is not None and os.path.getsize(path) < 600 * 1024
    meta = json.loads(open(path[:-5] + ".json").read())
    assert meta["name"] == name and meta["method"] in available_methods()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    record = json.loads(open(os.path.join(root, meta["record"])).read())
    assert record["registry_method"] == meta["method"] and record["eps"] == meta["eps"] == float(name.rsplit("-", 1)[1])
    assert record["options"] == meta["options"] and record["seed"] == meta["seed"]
    first = meta[f"campaign_first{record['certified_images']}"]
    assert all(first[k] == record[k] for k in ("standard_acc", "pgd_acc", "cert_box", "cert_box_crown"))
    x, y = load_mnist("test")
    with torch.no_grad():
        acc = float((verikit.from_onnx(path).forward(x[:500]).argmax(1) == y[:500]).float().mean())
    assert abs(acc - meta["clean_acc_first500"]) < 1e-9
