"""`verikit info` / `verikit domains` and the bad-input contract: one-line error, exit code 2."""
import os
import subprocess

import pytest
from click.testing import CliRunner

from conftest import TEST_DATA
from verikit.cli import main

ACAS = os.path.join(TEST_DATA, "ACASXU_run2a_1_1_batch_2000.onnx")


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_info_reports_ops_parameters_and_the_onnxruntime_check():
    r = _run("info", ACAS)
    assert r.exit_code == 0, r.output
    assert "input:  input [1, 1, 1, 5]" in r.output
    assert "MatMul x7" in r.output and "Linear x7" in r.output
    # 6 hidden layers of 50 plus in/out layers: (5*50+50) + 5*(50*50+50) + (50*5+5)
    assert f"parameters: {300 + 5 * 2550 + 255 + 5:,}" in r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("onnxruntime check")][0]
    assert float(line.split("max relative error ")[1].split()[0]) <= 1e-5


def test_domains_lists_box():
    r = _run("domains")
    assert r.exit_code == 0 and "box" in r.output and "interval" in r.output


def _bad_model(tmp_path, kind):
    if kind == "missing":
        return str(tmp_path / "missing.onnx")
    if kind == "truncated":
        data = open(ACAS, "rb").read()
        (tmp_path / "t.onnx").write_bytes(data[:5000])
        return str(tmp_path / "t.onnx")
    if kind == "garbage":
        (tmp_path / "g.onnx").write_bytes(os.urandom(2000))
        return str(tmp_path / "g.onnx")
    if kind == "directory":
        return str(tmp_path)
    if kind == "unsupported":
        import onnx
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("LogSoftmax", ["x"], ["y"], name="sm"), ], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(m, str(tmp_path / "u.onnx"))
        return str(tmp_path / "u.onnx")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "directory", "unsupported"])
def test_bad_models_give_exit_code_2_and_one_line(tmp_path, kind):
    r = _run("info", _bad_model(tmp_path, kind))
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if kind == "unsupported":
        assert "sm (LogSoftmax" in err[0]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run(["verikit", "info", str(tmp_path / "nope.onnx")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("error: model file not found") and "Traceback" not in out.stderr


def test_unknown_command_is_a_usage_error():
    assert _run("frobnicate").exit_code == 2
