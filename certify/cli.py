"""`verikit certify` and `verikit vnncomp`: parse flags, call the library, print results.

Exit codes: 0 the run finished (whatever the verdicts), 2 bad input (bad flag value, unknown
domain, missing or corrupt model/data, shape mismatch), 130 interrupted by Ctrl-C (results
finished so far are kept in --output). `vnncomp` exits 1 when an answer contradicts the
`expected` column.
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

from verikit.errors import VerikitError

_DEFAULT_CHAIN = ("box", "deeppoly", "crown")


def _floats(text, what):
    if text is None:
        return None
    try:
        vals = [float(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise VerikitError(f"bad {what} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise VerikitError(f"empty {what}")
    return vals


def _set_threads(n):
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _domain_names(text):
    from verikit.domains import available_domains, parse_domain_list

    if text is None:
        avail = available_domains()
        return [d for d in _DEFAULT_CHAIN if d in avail]
    return parse_domain_list(text)


def _chain_config(domains, attack, attack_steps, attack_restarts, timeout, alpha_steps, milp_solver, milp_threads,
                  model, vnn=False):
    from .chain import ChainConfig

    if timeout is not None and timeout <= 0:
        raise VerikitError("--timeout must be positive")
    opts = {"alpha_steps": alpha_steps, "solver": milp_solver, "threads": milp_threads}
    # VNN-LIB boxes are wide and have few inputs: many cheap parallel starts pay off there
    attack_steps = attack_steps or (100 if vnn else 20)
    attack_restarts = attack_restarts or (200 if vnn else 2)
    return ChainConfig(domains=domains, domain_options={d: opts for d in domains}, attack=attack,
                       attack_steps=attack_steps, attack_restarts=attack_restarts, timeout=timeout,
                       onnx_path=model.path, onnx_input=model.onnx_input)


def _chain_options(f):
    opts = [
        click.option("--domains", default=None,
                     help="comma list of domains, cheap to exact (default: those of box,deeppoly,crown registered); "
                          "see `verikit domains`"),
        click.option("--timeout", type=float, default=None, help="seconds per sample / per property"),
        click.option("--attack/--no-attack", default=True, show_default=True, help="run PGD before the domains"),
        click.option("--attack-steps", type=click.IntRange(1), default=None,
                     help="PGD steps per start (default: 20 on datasets, 100 on VNN-LIB properties)"),
        click.option("--attack-restarts", type=click.IntRange(1), default=None,
                     help="PGD starts, run side by side (default: 2 on datasets, 200 on VNN-LIB properties)"),
        click.option("--alpha-steps", type=click.IntRange(0), default=None, help="alpha-CROWN optimisation steps (crown)"),
        click.option("--milp-solver", type=click.Choice(["auto", "highs", "gurobi"]), default=None,
                     help="MILP back-end (milp)"),
        click.option("--milp-threads", type=click.IntRange(1), default=None, help="solver threads (milp)"),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--threads", type=click.IntRange(1), default=None,
                     help="torch CPU threads (1 is fastest for small networks on a busy machine)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command()
@click.argument("model")
@click.option("--eps", default=None, help="L-inf radius: 0.1, 8/255, or a sweep 1/255,2/255,8/255")
@click.option("--vnnlib", "vnnlib_path", default=None, type=click.Path(), help="check this VNN-LIB property instead")
@click.option("--result-file", default=None, type=click.Path(), help="(--vnnlib) write a VNN-COMP result file")
@click.option("--sat-unsat", is_flag=True, help="(--vnnlib) answer sat/unsat instead of violated/holds")
@click.option("--dataset", default="mnist", show_default=True, help="mnist, fashion-mnist, cifar10 or PATH.npz")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "train"]))
@click.option("--num-samples", type=click.IntRange(1), default=100, show_default=True)
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, help="index of the first sample")
@click.option("--mean", default=None, help="normalisation mean(s), comma list, if not inside the model")
@click.option("--std", default=None, help="normalisation std(s), comma list, if not inside the model")
@click.option("--data-range", default="0,1", show_default=True, help="valid input range LO,HI (the ball is clipped to it)")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="samples bounded together")
@click.option("--output", "-o", default=None, type=click.Path(), help="stream per-sample records (JSON lines) here")
@click.option("--resume", is_flag=True, help="skip the samples --output already holds")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--plot", default=None, type=click.Path(), help="(eps sweep) save certified accuracy vs eps as PNG")
@_chain_options
def certify(model, eps, vnnlib_path, result_file, sat_unsat, dataset, split, num_samples, start, mean, std,
            data_range, batch_size, output, resume, as_json, plot, domains, timeout, attack, attack_steps,
            attack_restarts, alpha_steps, milp_solver, milp_threads, device, threads):
    """Certify L-inf robustness of test samples of an ONNX MODEL (file or shipped model name),
    or check a VNN-LIB property with --vnnlib.

    Per sample: misclassified -> not certified; else PGD attack (a re-checked counterexample
    falsifies), then the domains in order until one proves robustness.
    Exit codes: 0 ran, 2 bad input, 130 interrupted (finished records are kept).
    """
    from .model import load_model

    _set_threads(threads)
    domain_names = _domain_names(domains)
    if vnnlib_path is not None:
        if eps is not None:
            raise VerikitError("use either --eps or --vnnlib, not both")
        loaded = load_model(model, _floats(mean, "--mean"), _floats(std, "--std"), device)
        cfg = _chain_config(domain_names, attack, attack_steps, attack_restarts, timeout, alpha_steps, milp_solver,
                            milp_threads, loaded, vnn=True)
        return _certify_vnnlib(loaded, vnnlib_path, cfg, result_file, sat_unsat, as_json)
    if eps is None:
        raise VerikitError("give --eps (e.g. --eps 0.1) or --vnnlib PROPERTY")
    if resume and output is None:
        raise VerikitError("--resume needs --output FILE")
    from .eps import parse_eps_list

    eps_list = parse_eps_list(eps)
    rng = _floats(data_range, "--data-range")
    if len(rng) != 2 or not rng[0] < rng[1]:
        raise VerikitError(f"bad --data-range {data_range!r}: expected LO,HI with LO < HI")
    loaded = load_model(model, _floats(mean, "--mean"), _floats(std, "--std"), device)
    cfg = _chain_config(domain_names, attack, attack_steps, attack_restarts, timeout, alpha_steps, milp_solver,
                        milp_threads, loaded)
    from verikit.data_sources import fit_to_model, load_dataset

    images, labels = load_dataset(dataset, split)
    if start >= len(labels):
        raise VerikitError(f"--start {start} is past the end of the dataset ({len(labels)} samples)")
    indices = list(range(start, min(start + num_samples, len(labels))))
    images = fit_to_model(images, loaded.graph.input_shape)
    _run_dataset(loaded, images, labels, indices, eps_list, cfg, tuple(rng), batch_size, output, resume,
                 as_json, plot, domain_names)


def _run_dataset(loaded, images, labels, indices, eps_list, cfg, data_range, batch_size, output, resume, as_json,
                 plot, domain_names):
    from .records import RecordWriter
    from .report import format_summary, format_sweep, plot_sweep, summarize
    from .robustness import certify_samples, validate_samples

    validate_samples(loaded, images, labels, indices, data_range)  # before the progress bar starts
    stages = (["attack"] if cfg.attack else []) + list(domain_names)
    writer = RecordWriter(output, resume=resume, model=loaded.path)
    interrupted = False
    try:
        with click.progressbar(length=len(indices) * len(eps_list), label="certifying", file=sys.stderr,
                               show_pos=True) as bar:
            certify_samples(loaded, images, labels, indices, eps_list, cfg, writer, data_range, batch_size,
                            on_done=bar.update)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        writer.close()
    wanted = {f"{e:.12g}" for e in eps_list}
    index_set = set(indices)
    recs = [r for r in writer.records if f"{float(r['eps']):.12g}" in wanted and int(r["index"]) in index_set]
    summary = summarize(recs, stages)
    if as_json:
        click.echo(json.dumps({"model": loaded.path, "domains": domain_names, "interrupted": interrupted,
                               "results": summary}, indent=2))
    else:
        click.echo(format_summary(summary), nl=False)
        if len(summary) > 1:
            click.echo(format_sweep(summary), nl=False)
    if plot is not None and summary:
        plot_sweep(summary, plot, title=os.path.basename(loaded.path))
    if interrupted:
        where = f"; finished records are in {output} (continue with --resume)" if output else ""
        click.echo(f"interrupted after {len(recs)} samples{where}", err=True)
        sys.exit(130)


def _certify_vnnlib(loaded, vnnlib_path, cfg, result_file, sat_unsat, as_json):
    from .vnn import result_text, check_property
    from .vnnlib import load_vnnlib

    prop = load_vnnlib(vnnlib_path)
    res = check_property(loaded, prop, cfg)
    if result_file:
        with open(result_file, "w", encoding="utf-8") as f:
            f.write(result_text(res, sat_unsat))
    if as_json:
        click.echo(json.dumps({"model": loaded.path, "property": vnnlib_path, "result": res.answer,
                               "seconds": res.seconds, "settled_by": res.by, "note": res.note}))
    else:
        click.echo(result_text(res, sat_unsat).splitlines()[0])
        click.echo(f"({len(prop.cases)} input box(es), {res.seconds:.2f} s"
                   + (f", settled by {', '.join(b or '-' for b in res.by)}" if res.by else "")
                   + (f"; {res.note}" if res.note else "") + ")", err=True)


@click.command()
@click.argument("instances", type=click.Path())
@click.option("--output", "-o", default="results.csv", show_default=True, type=click.Path(),
              help="results CSV (benchmark,onnx,vnnlib,result,seconds,expected,agrees,note)")
@click.option("--benchmark", "benchmarks", multiple=True, help="only these benchmarks (repeatable)")
@click.option("--max-timeout", type=float, default=None, help="cap every instance's timeout (seconds)")
@click.option("--result-dir", default=None, type=click.Path(), help="also write one VNN-COMP result file per instance")
@_chain_options
def vnncomp(instances, output, benchmarks, max_timeout, result_dir, domains, timeout, attack, attack_steps,
            attack_restarts, alpha_steps, milp_solver, milp_threads, device, threads):
    """Run every (onnx, vnnlib, timeout) row of an INSTANCES csv and write a results CSV.

    Exit codes: 0 ran, 1 some answer contradicts the `expected` column, 2 bad input.
    """
    import csv

    from .model import load_model
    from .vnn import UNKNOWN, VnnResult, check_property, result_text
    from .vnnlib import load_vnnlib

    _set_threads(threads)
    domain_names = _domain_names(domains)
    rows = _read(instances, benchmarks)
    models, out_rows, wrong = {}, [], []
    with click.progressbar(rows, label="instances", file=sys.stderr) as bar:
        for inst in bar:
            if inst["onnx_path"] not in models:
                models[inst["onnx_path"]] = load_model(inst["onnx_path"], device=device)
            loaded = models[inst["onnx_path"]]
            limit = timeout if timeout is not None else inst["timeout"]
            if max_timeout is not None:
                limit = min(limit, max_timeout) if limit is not None else max_timeout
            cfg = _chain_config(domain_names, attack, attack_steps, attack_restarts, limit, alpha_steps,
                                milp_solver, milp_threads, loaded, vnn=True)
            try:
                res = check_property(loaded, load_vnnlib(inst["vnnlib_path"]), cfg)
            except VerikitError as e:  # one broken instance (e.g. a domain that cannot handle it) ends only itself
                res = VnnResult("error", 0.0, note=str(e))
                click.echo(f"\nerror on {inst['onnx']} {inst['vnnlib']}: {e}", err=True)
            agrees = "" if res.answer in (UNKNOWN, "error") or not inst["expected"] else str(res.answer == inst["expected"])
            if agrees == "False":
                wrong.append(inst)
            out_rows.append([inst["benchmark"], inst["onnx"], inst["vnnlib"], res.answer, f"{res.seconds:.3f}",
                             inst["expected"], agrees, res.note])
            if result_dir:
                os.makedirs(result_dir, exist_ok=True)
                stem = f"{inst['benchmark'] + '_' if inst['benchmark'] else ''}" \
                       f"{os.path.splitext(os.path.basename(inst['onnx']))[0]}_{os.path.splitext(os.path.basename(inst['vnnlib']))[0]}"
                with open(os.path.join(result_dir, stem + ".txt"), "w", encoding="utf-8") as f:
                    f.write(result_text(res))
    with open(output, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "onnx", "vnnlib", "result", "seconds", "expected", "agrees", "note"])
        w.writerows(out_rows)
    n = len(out_rows)
    count = lambda a: sum(1 for r in out_rows if r[3] == a)
    answered = n - count(UNKNOWN) - count("error")
    agree = sum(1 for r in out_rows if r[6] == "True")
    click.echo(f"{n} instances: {count('holds')} holds, {count('violated')} violated, {count(UNKNOWN)} unknown, "
               f"{count('error')} errors; "
               f"{agree} of {answered} answers checked against expected agree; "
               f"total {sum(float(r[4]) for r in out_rows):.1f} s; results in {output}")
    for inst in wrong:
        click.echo(f"WRONG ANSWER: {inst['onnx']} {inst['vnnlib']} (expected {inst['expected']})")
    if wrong:
        sys.exit(1)


def _read(instances, benchmarks):
    from .vnn import read_instances

    rows = read_instances(instances)
    if benchmarks:
        known = {r["benchmark"] for r in rows}
        bad = [b for b in benchmarks if b not in known]
        if bad:
            raise VerikitError(f"unknown benchmark(s) {', '.join(bad)}; the file has {', '.join(sorted(known))}")
        rows = [r for r in rows if r["benchmark"] in benchmarks]
    return rows
