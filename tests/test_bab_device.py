"""Every tensor a bab search creates lives on the device of its inputs (so `--device cuda`
searches on the GPU without mixing devices). No GPU is needed to check it: with torch's default
device set to `meta`, a tensor created without an explicit device lands on `meta` and the
first operation that mixes it with the (CPU) inputs fails."""
import pytest
import torch

from test_bab_activation_split import _queries
from test_bab_domain import _hard_case, case
from verikit.domains import get_domain


def _search_on_meta_default(graph, box, spec, **opts):
    torch.set_default_device("meta")
    try:
        return get_domain("bab", **opts).bound(graph, box, spec)
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("kind", ["relu splits", "input splits", "sigmoid interval splits"])
def test_the_search_creates_no_tensor_off_the_inputs_device(kind):
    if kind == "relu splits":
        (graph, box, spec), opts = _hard_case(), dict(input_split=False, timeout=20.0)
    elif kind == "input splits":
        (graph, box, spec), opts = case(0, [3, 12, 12, 2], 0.6), dict(timeout=20.0)
    else:
        (graph, box, spec), opts = _queries(count=3)[2], dict(timeout=20.0)
    res = _search_on_meta_default(graph, box, spec, **opts)
    assert res.info["samples"][0]["visited"] > 1  # the search really branched
    assert res.lower.device == box.lo.device and res.status[0] in ("verified", "falsified", "unknown")
    want = get_domain("bab", **opts).bound(graph, box, spec)
    assert res.status == want.status  # and it is the same search
