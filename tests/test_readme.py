"""The README's examples run as written, from the repository root."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import SHARED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    """(heading, language, code) of every fenced block, with the heading it sits under."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    out, heading = [], ""
    for m in re.finditer(r"^(#{2,4} [^\n]*)$|^ *```(\w*)\n(.*?)^ *```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
        else:
            out.append((heading, m.group(2), m.group(3)))
    return out


def _python_block(heading):
    found = [code for h, lang, code in _blocks() if h == heading and lang == "python"]
    assert found, f"no python block under {heading!r}"
    return found[0]


@pytest.mark.parametrize("which", [0, 1], ids=["certify-python-api", "core-python-api"])
def test_python_api_blocks_run(which, monkeypatch, capsys):
    """The two "Python API" blocks: the certifier's chain, and the core API (graph, box, spec)."""
    monkeypatch.chdir(ROOT)
    code = [c for h, lang, c in _blocks() if h == "Python API" and lang == "python"][which]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    if which == 0:
        assert "Chain" in code and "sample 0 " in printed and "verified" in printed
    else:
        assert "get_domain" in code and "tensor(" in printed


def test_deeppoly_crown_block_runs(monkeypatch, capsys):
    if not os.path.exists(os.path.join(SHARED, "vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")):
        pytest.skip("../shared missing")
    monkeypatch.chdir(ROOT)
    exec(compile(_python_block("DeepPoly, CROWN and α-CROWN"), "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["box", "deeppoly", "crown", "crown"]


@pytest.mark.slow
def test_milp_block_runs(monkeypatch):
    if not os.path.exists(os.path.join(SHARED, "vnncomp2021", "acasxu")):
        pytest.skip("../shared missing")
    monkeypatch.chdir(ROOT)
    exec(compile(_python_block("Complete verification: the `milp` domain"), "README.md", "exec"), {})


def _verikit():
    return os.path.join(os.path.dirname(sys.executable), "verikit")


def test_vnnlib_console_example_runs_from_the_repository_root(tmp_path):
    """Run in a scratch folder that looks like the repository root (its out.txt stays there)."""
    (code,) = [c for h, lang, c in _blocks() if h == "VNN-LIB properties" and lang == "console"]
    lines = code.splitlines()
    cmd = lines[0]
    assert cmd.startswith("$ verikit certify tests/data/")
    os.symlink(os.path.join(ROOT, "tests"), tmp_path / "tests")
    args = shlex.split(cmd[2:])
    res = subprocess.run([_verikit(), *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == lines[1] == "violated"
    written = (tmp_path / "out.txt").read_text().splitlines()
    documented = lines[lines.index("$ cat out.txt") + 1:]
    assert written[0] == documented[0] and written[1] == documented[1] and written[-1] == documented[-1]


def test_plugin_commands_run_as_written():
    block = [c for h, lang, c in _blocks() if h == "Adding your own domain" and lang == ""]
    cmds = [ln.strip() for c in block for ln in c.splitlines() if "VERIKIT_PLUGINS=" in ln]
    listing = next(c for c in cmds if c.endswith("verikit domains"))
    words = shlex.split(listing)
    env = dict(os.environ)
    while "=" in words[0]:
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    res = subprocess.run([_verikit(), *words[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "splitbox" in res.stdout
