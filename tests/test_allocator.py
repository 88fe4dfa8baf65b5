"""verikit.allocator: glibc's mallopt settings for large tensors, and the console script
turning them on (and off by the environment)."""
from __future__ import annotations

import sys

import pytest
import torch

from verikit import allocator


@pytest.fixture
def restore_defaults():
    yield
    allocator.keep_freed_memory(False)


def test_settings_are_taken_and_tensors_still_work(restore_defaults):
    if allocator._glibc() is None:
        pytest.skip("not glibc: keep_freed_memory() changes nothing here")
    assert allocator.keep_freed_memory(True) is True
    for _ in range(3):  # large blocks (above glibc's 32 MB mmap ceiling) freed and allocated again
        t = torch.ones(3, 1 << 22)
        assert float(t.sum()) == 3 * (1 << 22)
        del t
    assert allocator.keep_freed_memory(False) is True


def test_environment_turns_it_off(monkeypatch, restore_defaults):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda enable=True: calls.append(enable) or True)
    for value in ("0", "off", "False"):
        monkeypatch.setenv(allocator.ENV, value)
        assert allocator.keep_freed_memory_from_env() is False
    assert calls == []
    monkeypatch.delenv(allocator.ENV)
    assert allocator.keep_freed_memory_from_env() is True and calls == [True]


def test_console_script_turns_it_on(monkeypatch, capsys):
    """The real console path (no args given: sys.argv) sets the allocator up before the command;
    test runners passing args leave the process alone."""
    from verikit import cli

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory_from_env", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["verikit", "domains"])
    with pytest.raises(SystemExit) as e:
        cli.main.main()
    assert e.value.code == 0 and calls == [1]
    assert "crown" in capsys.readouterr().out
    cli.main.main(["domains"], standalone_mode=False)
    assert calls == [1]


def test_the_setting_reaches_worker_processes(monkeypatch, restore_defaults):
    """Taken by a command, the environment says 1, and a worker (default=False) follows it;
    without it a worker leaves its allocator alone."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda enable=True: calls.append(enable) or True)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.keep_freed_memory_from_env(default=False) is False and calls == []
    assert allocator.keep_freed_memory_from_env() is True
    import os

    assert os.environ[allocator.ENV] == "1"
    assert allocator.keep_freed_memory_from_env(default=False) is True and calls == [True, True]
    from verikit.certify import workers

    monkeypatch.setattr(workers, "_ALLOCATOR_SET", False)
    workers._threads(0)
    assert calls == [True, True, True] and workers._ALLOCATOR_SET
    workers._threads(0)
    assert len(calls) == 3  # once per process
