"""Bad input, table-driven, for every command and flag.

Each case must give exit code 2, exactly one line on stderr that starts with `error:` and names
the flag or file at fault, no traceback, and must leave every file that already existed
untouched and create nothing (validation happens before any work and any output). Every case
runs in-process (click's CliRunner); a sample of them also through the installed `verikit`
console script, and a few through `python -m verikit`.
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TEST_DATA
from verikit.cli import main

MODEL = os.path.join(TEST_DATA, "tiny_mnist_mlp.onnx")
SAT = os.path.join(TEST_DATA, "test_sat.onnx")
PROP = os.path.join(TEST_DATA, "test_prop.vnnlib")
SENTINEL = "SENTINEL: must survive a failed command\n"


def _record(i=0, model=MODEL):
    return {"index": i, "eps": 0.1, "status": "unknown", "by": None, "label": 0, "prediction": 0, "margin": None,
            "time": 0.1, "times": {}, "note": "", "model": model}


def _softmax_model(path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("LogSoftmax", ["x"], ["y"], name="sm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the cases (read-only for them); outputs live in each case's own folder."""
    d = tmp_path_factory.mktemp("inputs")
    f = {"model": MODEL, "sat": SAT, "prop": PROP, "indir": str(d)}
    (d / "junk.onnx").write_bytes(b"not a model")
    f["junk"] = str(d / "junk.onnx")
    _softmax_model(str(d / "softmax.onnx"))
    f["softmax"] = str(d / "softmax.onnx")
    np.savez(d / "cifar.npz", x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, np.int64))
    f["cifar"] = str(d / "cifar.npz")
    np.savez(d / "raw.npz", x=np.full((2, 1, 28, 28), 200, np.float32), y=np.zeros(2, np.int64))
    f["raw"] = str(d / "raw.npz")
    (d / "broken.vnnlib").write_text("(declare-const X_0 Real)\n(assert (<= X_0 \n")
    f["badvnn"] = str(d / "broken.vnnlib")
    bench = d / "bench"
    bench.mkdir()
    for name in ("test_sat.onnx", "test_prop.vnnlib"):
        shutil.copy(os.path.join(TEST_DATA, name), bench / name)
    rows = {"csv": "test_sat.onnx,test_prop.vnnlib,60,violated",
            "badexpected": "test_sat.onnx,test_prop.vnnlib,60,maybe",
            "badtimeout": "test_sat.onnx,test_prop.vnnlib,soon,violated",
            "missingfile": "nothere.onnx,test_prop.vnnlib,60,violated"}
    for key, row in rows.items():
        (bench / f"{key}.csv").write_text("onnx,vnnlib,timeout_s,expected\n" + row + "\n")
        f[key] = str(bench / f"{key}.csv")
    (bench / "empty.csv").write_text("")
    f["emptycsv"] = str(bench / "empty.csv")
    # a fake training run: config.json and a damaged checkpoint
    from verikit.train.config import TrainConfig

    for name, ckpt in (("run", b"\x80\x04garbage"), ("nockpt", None)):
        run = d / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps(TrainConfig(model="mlp", method="standard", epochs=1).to_dict()))
        if ckpt is not None:
            (run / "checkpoint.pt").write_bytes(ckpt)
        f[name] = str(run)
    (d / "plugin_broken.py").write_text("def oops(:\n")
    return f


# (id, command line with {placeholders}, text the error must contain)
# {out}: an existing file with sentinel content in the case's own folder; {new}: a path that must
# not be created; {dir}: an existing folder; {nodir}: a path in a folder that does not exist.
CERTIFY = [
    ("eps-negative", "certify {model} --eps -1 -o {out}", "--eps value '-1'"),
    ("eps-text", "certify {model} --eps abc -o {out}", "'abc'"),
    ("eps-div0", "certify {model} --eps 1/0 -o {out}", "division by zero"),
    ("eps-empty", "certify {model} --eps '' -o {out}", "empty --eps"),
    ("eps-nan", "certify {model} --eps nan -o {out}", "--eps value 'nan'"),
    ("eps-too-wide", "certify {model} --eps 2 -o {out}", "--eps 2 is wider than --data-range"),
    ("eps-missing", "certify {model} -o {out}", "--eps"),
    ("num-samples-0", "certify {model} --eps 0.1 --num-samples 0 -o {out}", "'--num-samples'"),
    ("num-samples-neg", "certify {model} --eps 0.1 --num-samples -3 -o {out}", "'--num-samples'"),
    ("start-neg", "certify {model} --eps 0.1 --start -1 -o {out}", "'--start'"),
    ("start-past-end", "certify {model} --eps 0.1 --start 100000 -o {out}", "--start 100000"),
    ("batch-size-0", "certify {model} --eps 0.1 --batch-size 0 -o {out}", "'--batch-size'"),
    ("split", "certify {model} --eps 0.1 --split valid -o {out}", "'--split'"),
    ("data-range-order", "certify {model} --eps 0.1 --data-range 1,0 -o {out}", "--data-range"),
    ("data-range-one", "certify {model} --eps 0.1 --data-range 0 -o {out}", "--data-range"),
    ("data-range-text", "certify {model} --eps 0.1 --data-range a,b -o {out}", "--data-range"),
    ("data-range-nan", "certify {model} --eps 0.1 --data-range 0,nan -o {out}", "--data-range"),
    ("mean-channels", "certify {model} --eps 0.1 --mean 0.1,0.2 --std 1,1 -o {out}", "--mean"),
    ("mean-text", "certify {model} --eps 0.1 --mean abc -o {out}", "--mean"),
    ("std-zero", "certify {model} --eps 0.1 --std 0 -o {out}", "--std"),
    ("domains-unknown", "certify {model} --eps 0.1 --domains box,octagon -o {out}", "octagon"),
    ("domains-twice", "certify {model} --eps 0.1 --domains box,box,crown -o {out}", "--domains"),
    ("domains-empty", "certify {model} --eps 0.1 --domains , -o {out}", "--domains"),
    ("domain-option-key", "certify {model} --eps 0.1 --domains box,crown --domain-option crown.nope=1 -o {out}",
     "nope"),
    ("domain-option-type", "certify {model} --eps 0.1 --domains crown --domain-option crown.alpha_steps=abc -o {out}",
     "crown.alpha_steps"),
    ("domain-option-form", "certify {model} --eps 0.1 --domain-option alpha_steps -o {out}", "--domain-option"),
    ("domain-option-value", "certify {model} --eps 0.1 --domains box,milp --domain-option milp.tighten=x -o {out}",
     "tighten"),
    ("domain-option-not-in-chain", "certify {model} --eps 0.1 --domains box --domain-option crown.alpha_steps=5 "
                                   "-o {out}", "'crown' is not in --domains"),
    ("timeout-0", "certify {model} --eps 0.1 --timeout 0 -o {out}", "--timeout"),
    ("timeout-neg", "certify {model} --eps 0.1 --timeout -5 -o {out}", "--timeout"),
    ("timeout-nan", "certify {model} --eps 0.1 --timeout nan -o {out}", "--timeout"),
    ("timeout-text", "certify {model} --eps 0.1 --timeout soon -o {out}", "'--timeout'"),
    ("attack-steps-0", "certify {model} --eps 0.1 --attack-steps 0 -o {out}", "'--attack-steps'"),
    ("attack-restarts-0", "certify {model} --eps 0.1 --attack-restarts 0 -o {out}", "'--attack-restarts'"),
    ("alpha-steps-neg", "certify {model} --eps 0.1 --alpha-steps -1 -o {out}", "'--alpha-steps'"),
    ("milp-solver", "certify {model} --eps 0.1 --milp-solver cplex -o {out}", "'--milp-solver'"),
    ("milp-threads-neg", "certify {model} --eps 0.1 --milp-threads -1 -o {out}", "'--milp-threads'"),
    ("threads-neg", "certify {model} --eps 0.1 --threads -2 -o {out}", "'--threads'"),
    ("device", "certify {model} --eps 0.1 --device tpu -o {out}", "tpu"),
    ("output-dir", "certify {model} --eps 0.1 -o {dir}", "is a directory"),
    ("output-nodir", "certify {model} --eps 0.1 -o {nodir}", "does not exist"),
    ("resume-no-output", "certify {model} --eps 0.1 --resume", "--resume needs --output"),
    ("resume-missing-field", "certify {model} --eps 0.1 -o {rec_missing} --resume", "'status'"),
    ("resume-wrong-type", "certify {model} --eps 0.1 -o {rec_type} --resume", "'index'"),
    ("resume-not-json", "certify {model} --eps 0.1 -o {rec_json} --resume", ":1:"),
    ("resume-other-model", "certify {model} --eps 0.1 -o {rec_other} --resume", "another model"),
    ("plot-nodir", "certify {model} --eps 0.1,0.2 --plot {nodir} -o {out}", "--plot"),
    ("plot-one-eps", "certify {model} --eps 0.1 --plot {new}.png -o {out}", "--plot"),
    ("plot-format", "certify {model} --eps 0.1,0.2 --plot {new}.txt -o {out}", "--plot"),
    ("plot-dir", "certify {model} --eps 0.1,0.2 --plot {dir} -o {out}", "--plot"),
    ("dataset-unknown", "certify {model} --eps 0.1 --dataset imagenet -o {out}", "imagenet"),
    ("dataset-missing", "certify {model} --eps 0.1 --dataset {indir}/none.npz -o {out}", "none.npz"),
    ("dataset-shape", "certify {model} --eps 0.1 --dataset {cifar} -o {out}", "the model expects"),
    ("dataset-range", "certify {model} --eps 0.1 --dataset {raw} -o {out}", "--data-range"),
    ("model-missing", "certify {indir}/missing.onnx --eps 0.1 -o {out}", "missing.onnx"),
    ("model-junk", "certify {junk} --eps 0.1 -o {out}", "junk.onnx"),
    ("model-dir", "certify {indir} --eps 0.1 -o {out}", "inputs"),
    ("model-unsupported", "certify {softmax} --eps 0.1 -o {out}", "LogSoftmax"),
    ("result-file-no-vnnlib", "certify {model} --eps 0.1 --result-file {out}", "--result-file"),
    ("sat-unsat-no-vnnlib", "certify {model} --eps 0.1 --sat-unsat -o {out}", "--sat-unsat"),
    ("unknown-flag", "certify {model} --eps 0.1 --frobnicate -o {out}", "--frobnicate"),
    ("workers-0", "certify {model} --eps 0.1 --workers 0 -o {out}", "--workers"),
    ("workers-text", "certify {model} --eps 0.1 --workers two -o {out}", "'--workers'"),
    ("ray-address", "certify {model} --eps 0.1 --ray nowhere -o {out}", "--ray"),
    ("ray-port", "certify {model} --eps 0.1 --ray localhost:99999 -o {out}", "--ray"),
    ("gpus-per-worker-neg", "certify {model} --eps 0.1 --workers 2 --gpus-per-worker -1 -o {out}",
     "--gpus-per-worker"),
    ("gpus-per-worker-no-gpu", "certify {model} --eps 0.1 --gpus-per-worker 1 -o {out}", "no GPU"),
    ("model-argument-missing", "certify --eps 0.1 -o {out}", "MODEL"),
]
VNNLIB = [
    ("vnnlib-missing", "certify {sat} --vnnlib {indir}/none.vnnlib --result-file {out}", "none.vnnlib"),
    ("vnnlib-dir", "certify {sat} --vnnlib {dir} --result-file {out}", "--vnnlib"),
    ("vnnlib-malformed", "certify {sat} --vnnlib {badvnn} --result-file {out}", "broken.vnnlib"),
    ("vnnlib-with-eps", "certify {sat} --vnnlib {prop} --eps 0.1 --result-file {out}", "--eps"),
    ("vnnlib-with-num-samples", "certify {sat} --vnnlib {prop} --num-samples 5 --result-file {out}", "--num-samples"),
    ("vnnlib-with-output", "certify {sat} --vnnlib {prop} -o {out}", "--output"),
    ("vnnlib-with-plot", "certify {sat} --vnnlib {prop} --plot {new}.png", "--plot"),
    ("result-file-nodir", "certify {sat} --vnnlib {prop} --result-file {nodir}", "--result-file"),
    ("result-file-dir", "certify {sat} --vnnlib {prop} --result-file {dir}", "--result-file"),
    ("vnnlib-mismatch", "certify {model} --vnnlib {prop} --result-file {out}", "5 inputs"),
    ("vnnlib-timeout", "certify {sat} --vnnlib {prop} --timeout -1 --result-file {out}", "--timeout"),
    ("vnnlib-workers", "certify {sat} --vnnlib {prop} --workers 0 --result-file {out}", "--workers"),
]
VNNCOMP = [
    ("instances-missing", "vnncomp {indir}/none.csv -o {out}", "none.csv"),
    ("instances-dir", "vnncomp {dir} -o {out}", "directory"),
    ("vnncomp-output-nodir", "vnncomp {csv} -o {nodir}", "--output"),
    ("vnncomp-output-dir", "vnncomp {csv} -o {dir}", "--output"),
    ("max-timeout-neg", "vnncomp {csv} --max-timeout -1 -o {out}", "--max-timeout"),
    ("max-timeout-0", "vnncomp {csv} --max-timeout 0 -o {out}", "--max-timeout"),
    ("vnncomp-timeout", "vnncomp {csv} --timeout 0 -o {out}", "--timeout"),
    ("benchmark-unknown", "vnncomp {csv} --benchmark nope -o {out}", "nope"),
    ("result-dir-file", "vnncomp {csv} --result-dir {out} -o {new}.csv", "--result-dir"),
    ("expected-bad", "vnncomp {badexpected} -o {out}", "expected value 'maybe'"),
    ("csv-bad-timeout", "vnncomp {badtimeout} -o {out}", "badtimeout.csv:2"),
    ("csv-missing-file", "vnncomp {missingfile} -o {out}", "nothere.onnx"),
    ("csv-empty", "vnncomp {emptycsv} -o {out}", "empty.csv"),
    ("vnncomp-domains-twice", "vnncomp {csv} --domains box,box -o {out}", "--domains"),
    ("vnncomp-threads", "vnncomp {csv} --threads -1 -o {out}", "'--threads'"),
    ("vnncomp-device", "vnncomp {csv} --device tpu -o {out}", "--device"),
    ("vnncomp-domains-unknown", "vnncomp {csv} --domains box,octagon -o {out}", "octagon"),
    ("vnncomp-domain-option", "vnncomp {csv} --domains crown --domain-option crown.nope=1 -o {out}", "nope"),
    ("vnncomp-attack-steps", "vnncomp {csv} --attack-steps 0 -o {out}", "'--attack-steps'"),
    ("vnncomp-attack-restarts", "vnncomp {csv} --attack-restarts 0 -o {out}", "'--attack-restarts'"),
    ("vnncomp-alpha-steps", "vnncomp {csv} --alpha-steps -1 -o {out}", "'--alpha-steps'"),
    ("vnncomp-milp-solver", "vnncomp {csv} --milp-solver cplex -o {out}", "'--milp-solver'"),
    ("vnncomp-milp-threads", "vnncomp {csv} --milp-threads -1 -o {out}", "'--milp-threads'"),
    ("vnncomp-workers-0", "vnncomp {csv} --workers 0 -o {out}", "--workers"),
    ("vnncomp-ray-address", "vnncomp {csv} --ray http://x -o {out}", "--ray"),
    ("vnncomp-gpus-per-worker", "vnncomp {csv} --workers 2 --gpus-per-worker nan -o {out}", "--gpus-per-worker"),
    ("vnncomp-resume-foreign", "vnncomp {csv} --resume -o {out}", "not a verikit vnncomp results file"),
]
TRAIN = [
    ("train-eps-wide", "train --eps 2 --out {new}", "--eps 2"),
    ("train-eps-neg", "train --eps -0.1 --out {new}", "--eps value '-0.1'"),
    ("train-eps-text", "train --eps abc --out {new}", "--eps value 'abc'"),
    ("train-epochs-0", "train --epochs 0 --out {new}", "--epochs"),
    ("train-batch-0", "train --batch-size 0 --out {new}", "--batch-size"),
    ("train-samples-0", "train --train-samples 0 --out {new}", "--train-samples"),
    ("train-samples-neg", "train --train-samples -5 --out {new}", "--train-samples"),
    ("eval-samples-0", "train --eval-samples 0 --out {new}", "--eval-samples"),
    ("train-threads-neg", "train --threads -2 --out {new}", "'--threads'"),
    ("sabr-lambda", "train --sabr-lambda 1.5 --out {new}", "--sabr-lambda"),
    ("lr-0", "train --lr 0 --out {new}", "--lr"),
    ("lr-nan", "train --lr nan --out {new}", "--lr"),
    ("lr-milestones-text", "train --lr-milestones a,b --out {new}", "--lr-milestones"),
    ("lr-milestones-0", "train --lr-milestones 0 --out {new}", "--lr-milestones"),
    ("warmup-neg", "train --warmup-epochs -1 --out {new}", "--warmup-epochs"),
    ("ramp-neg", "train --ramp-epochs -1 --out {new}", "--ramp-epochs"),
    ("reg-weight-neg", "train --reg-weight -1 --out {new}", "--reg-weight"),
    ("grad-clip-neg", "train --grad-clip -1 --out {new}", "--grad-clip"),
    ("l1-neg", "train --l1 -1 --out {new}", "--l1"),
    ("relu-shrink-0", "train --relu-shrink 0 --out {new}", "--relu-shrink"),
    ("seed-neg", "train --seed -1 --out {new}", "--seed"),
    ("train-model", "train --model resnet999 --out {new}", "resnet999"),
    ("train-dataset", "train --dataset imagenet --out {new}", "imagenet"),
    ("train-domain", "train --domain crown --out {new}", "crown"),
    ("train-method", "train --method magic --out {new}", "unknown training method 'magic'; available: cc-ibp"),
    ("train-method-option", "train --method mtl-ibp --method-option alfa=0.1 --out {new}", "no option(s) alfa"),
    ("train-method-option-value", "train --method mtl-ibp --method-option alpha=high --out {new}", "alpha"),
    ("train-method-option-form", "train --method-option 0.5 --out {new}", "NAME=VALUE"),
    ("train-device", "train --device tpu --out {new}", "'--device'"),
    ("checkpoint-minutes", "train --checkpoint-minutes -1 --out {new}", "'--checkpoint-minutes'"),
    ("standard-with-lambda", "train --method standard --sabr-lambda 0.5 --out {new}", "--sabr-lambda"),
    ("out-is-file", "train --out {out}", "--out"),
    ("out-is-run", "train --out {run}", "--force"),
    ("resume-missing", "train --resume {indir}/norun", "--resume"),
    ("resume-no-checkpoint", "train --resume {nockpt}", "checkpoint.pt"),
    ("resume-garbage", "train --resume {run}", "checkpoint"),
    ("resume-with-lr", "train --resume {run} --lr 0.1", "--lr"),
    ("resume-other-out", "train --resume {run} --out {new}", "--out"),
]
OTHER = [
    ("info-samples-0", "info {model} --samples 0", "'--samples'"),
    ("info-samples-neg", "info {model} --samples -3", "'--samples'"),
    ("info-missing", "info {indir}/none.onnx", "none.onnx"),
    ("info-threads", "info {model} --threads -1", "'--threads'"),
    ("domains-flag", "domains --bogus", "--bogus"),
    ("models-flag", "models --bogus", "--bogus"),
    ("plugin-missing", "VERIKIT_PLUGINS=no_such_plugin_module domains", "no_such_plugin_module"),
    ("plugin-broken", "VERIKIT_PLUGINS=plugin_broken domains", "plugin_broken"),
    ("unknown-command", "frobnicate", "frobnicate"),
]
CASES = CERTIFY + VNNLIB + VNNCOMP + TRAIN + OTHER
# run through the installed console script as well: one or more per command by default (each
# start-up costs seconds on a busy machine), the longer list with -m slow
SCRIPT_CASES = ["eps-too-wide", "vnncomp-output-nodir", "train-samples-0", "resume-garbage", "info-samples-0",
                "plugin-broken"]
SCRIPT_CASES_SLOW = ["domains-twice", "output-nodir", "resume-wrong-type", "plot-one-eps", "vnnlib-dir",
                     "result-file-nodir", "max-timeout-neg", "expected-bad", "eval-samples-0", "train-threads-neg",
                     "out-is-run", "num-samples-0", "model-unsupported", "unknown-flag"]
MODULE_CASES = ["eps-negative"]  # via `python -m verikit`


def _command_of(template):
    return template.split()[-1] if template.startswith("VERIKIT") else template.split()[0]


def test_the_table_is_large_and_covers_every_command_and_option():
    import click

    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    commands = {_command_of(c[1]) for c in CASES}
    assert {"certify", "vnncomp", "train", "info", "domains", "models"} <= commands
    for name in ("certify", "vnncomp", "train", "info"):
        cmd = main.get_command(None, name)
        templates = " ".join(c[1] for c in CASES if _command_of(c[1]) == name)
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.is_flag and p.name != "help":
                assert any(o in templates.split() for o in p.opts), f"no bad-input case for {name} {p.opts[0]}"


def _prepare(case_dir, files):
    """The case's folder: a sentinel output file, an existing sub-folder, prepared records."""
    case_dir.mkdir()
    (case_dir / "out.txt").write_text(SENTINEL)
    (case_dir / "adir").mkdir()
    recs = {"rec_missing": json.dumps({"index": 0, "eps": 0.1}) + "\n",
            "rec_type": json.dumps({**_record(), "index": "a"}) + "\n",
            "rec_json": "not json at all\n" + json.dumps(_record(1)) + "\n",
            "rec_other": json.dumps(_record(0, model="other.onnx")) + "\n"}
    for name, text in recs.items():
        (case_dir / f"{name}.jsonl").write_text(text)
    return {**files, "out": str(case_dir / "out.txt"), "dir": str(case_dir / "adir"),
            "nodir": str(case_dir / "nodir" / "x.png"), "new": str(case_dir / "new"),
            **{k: str(case_dir / f"{k}.jsonl") for k in recs}}


def _args(template, paths):
    import shlex

    words = shlex.split(template.format(**paths))
    env = {}
    while words and "=" in words[0] and words[0].split("=")[0].isupper():
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words


def _snapshot(folder):
    out = {}
    for root, dirs, names in os.walk(folder):
        for n in dirs + names:
            p = os.path.join(root, n)
            out[p] = None if os.path.isdir(p) else (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def _check(case_id, code, stderr, stdout, before, after, must_name):
    assert code == 2, f"{case_id}: exit code {code}\n{stdout}\n{stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case_id}: stderr is not one error line:\n{stderr}"
    assert must_name in lines[0], f"{case_id}: {must_name!r} not named in {lines[0]!r}"
    assert "Traceback" not in stderr + stdout
    assert after == before, f"{case_id}: files changed: {set(after) ^ set(before) or 'contents'}"


def _run_in_process(env, args, monkeypatch):
    import torch

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "VERIKIT_PLUGINS" in env:
        import verikit.domains.base as base

        monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)  # read VERIKIT_PLUGINS again
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)
    return res


@pytest.mark.parametrize("case_id,template,must_name", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case_id, template, must_name, files, tmp_path, monkeypatch):
    if case_id == "plugin-broken":
        monkeypatch.syspath_prepend(files["indir"])
    paths = _prepare(tmp_path / "case", files)
    env, args = _args(template, paths)
    before = _snapshot(tmp_path)
    res = _run_in_process(env, args, monkeypatch)
    assert not isinstance(res.exception, AssertionError), res.exception
    _check(case_id, res.exit_code, res.stderr, res.stdout, before, _snapshot(tmp_path), must_name)


def _verikit():
    exe = os.path.join(os.path.dirname(sys.executable), "verikit")
    return exe if os.path.exists(exe) else shutil.which("verikit")


@pytest.mark.skipif(_verikit() is None, reason="verikit console script not installed")
@pytest.mark.parametrize("selection", ["default", pytest.param("more", marks=pytest.mark.slow)])
def test_bad_input_through_the_console_script(selection, files, tmp_path):
    by_id = {c[0]: c for c in CASES}
    chosen = SCRIPT_CASES + [f"module:{m}" for m in MODULE_CASES] if selection == "default" else SCRIPT_CASES_SLOW
    jobs = []
    for case_id in chosen:
        as_module = case_id.startswith("module:")
        _, template, must_name = by_id[case_id.split(":")[-1]]
        case_dir = tmp_path / case_id.replace(":", "_")
        paths = _prepare(case_dir, files)
        env, args = _args(template, paths)
        cmd = [sys.executable, "-m", "verikit"] if as_module else [_verikit()]
        full_env = {**os.environ, **env, "PYTHONPATH": files["indir"] + os.pathsep + os.environ.get("PYTHONPATH", "")}
        jobs.append((case_id, cmd + args, full_env, case_dir, must_name))

    def run(job):
        case_id, cmd, env, case_dir, must_name = job
        before = _snapshot(case_dir)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        return case_id, p, before, _snapshot(case_dir), must_name

    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two start-ups at a time
        for case_id, p, before, after, must_name in pool.map(run, jobs):
            _check(case_id, p.returncode, p.stderr, p.stdout, before, after, must_name)


def test_unwritable_output_is_reported_before_any_work(tmp_path):
    """/sys refuses new files even to root (os.access would say yes there)."""
    target = "/sys/verikit-test-output.jsonl"
    try:
        open(target, "w").close()
        os.remove(target)
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    res = CliRunner().invoke(main, ["certify", MODEL, "--eps", "0.1", "-o", target])
    assert res.exit_code == 2 and res.stderr.startswith("error: --output /sys/") and "cannot write" in res.stderr
    assert res.stderr.count("\n") == 1
