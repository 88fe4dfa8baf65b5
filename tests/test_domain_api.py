"""The Domain API: registry, options, errors, the plug-in example through API and CLI, and
third-party domains through the `verikit.domains` entry-point group."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import verikit
from verikit.domains import Domain, available_domains, get_domain, parse_domain_list, register_domain, unregister_domain
from verikit.errors import UnknownDomainError, VerikitError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def test_builtin_domains_declare_their_properties():
    doms = available_domains()
    assert "box" in doms
    for name, cls in doms.items():
        assert cls.name == name and cls.description and isinstance(cls.complete, bool) and isinstance(cls.differentiable, bool)
    assert doms["box"].differentiable and not doms["box"].complete


def test_unknown_domain_lists_the_available_ones():
    with pytest.raises(UnknownDomainError) as err:
        get_domain("zonotope")
    assert "box" in str(err.value)
    with pytest.raises(UnknownDomainError, match="foo, bar"):
        parse_domain_list("box,foo,bar")


def test_unknown_option_is_rejected():
    with pytest.raises(VerikitError, match="no option"):
        get_domain("box", steps=3)


def test_register_requires_name_and_description():
    class Nameless(Domain):
        def bound(self, *a, **k):
            raise NotImplementedError

    with pytest.raises(ValueError):
        register_domain(Nameless)


def test_example_plugin_is_sound_and_at_least_as_tight_as_box():
    sys.path.insert(0, EXAMPLES)
    try:
        import split_box_domain  # noqa: F401  (registers "splitbox")
    finally:
        sys.path.remove(EXAMPLES)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        graph = verikit.from_torch(net, (2,))
        x = torch.rand(5, 2)
        spec = verikit.Spec.robustness(net(x).argmax(1), 3)
        ball = verikit.Box.linf_ball(x, 0.1)
        split = get_domain("splitbox", pieces=8).bound(graph, ball, spec)
        plain = get_domain("box").bound(graph, ball, spec)
        assert bool((split.lower >= plain.lower - 1e-6).all())
        assert bool((split.lower > plain.lower + 1e-6).any())
        ys = net(ball.sample(2000, torch.Generator().manual_seed(0)))  # (2000, 5, 3)
        for b in range(5):  # every sampled margin is above the plug-in's lower bound
            margins = spec.select([b]).values(ys[:, b].detach())
            assert bool((margins >= split.lower[b] - 1e-5).all())
    finally:
        unregister_domain("splitbox")


def test_example_plugin_appears_in_the_cli():
    env = {**os.environ, "PYTHONPATH": EXAMPLES, "VERIKIT_PLUGINS": "split_box_domain"}
    out = subprocess.run(["verikit", "domains"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "splitbox" in out.stdout and "example plug-in" in out.stdout


def test_entry_point_domain_from_another_package(tmp_path):
    """A domain shipped by a separate distribution via the `verikit.domains` entry point group."""
    (tmp_path / "thirdparty_dom.py").write_text(textwrap.dedent('''
        from verikit.domains import Domain
        from verikit.domains.box import BoxDomain

        class Widened(BoxDomain):
            name = "widened"
            description = "box, widened by one (third-party test domain)"
    '''))
    dist = tmp_path / "thirdparty_dom-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-dom\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[verikit.domains]\nwidened = thirdparty_dom:Widened\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(["verikit", "domains"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "widened" in out.stdout


def test_missing_plugin_module_is_a_clear_error():
    env = {**os.environ, "VERIKIT_PLUGINS": "no_such_module_xyz"}
    out = subprocess.run(["verikit", "domains"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "no_such_module_xyz" in out.stderr and "Traceback" not in out.stderr
