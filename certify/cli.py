"""`verikit certify` and `verikit vnncomp`: parse flags, check them all, call the library, print results.

Every flag value and every path is checked before any work starts (and before any output
file is touched). Exit codes: 0 the run finished (whatever the verdicts), 2 bad input,
130 interrupted by Ctrl-C, 143 stopped by SIGTERM (finished results are kept either way).
`vnncomp` exits 1 when an answer contradicts the `expected` column.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

import click
from click.core import ParameterSource

from verikit.cli import CONTEXT, original_args
from verikit.errors import VerikitError
from verikit.interrupts import Terminated, exit_code
from verikit.outputs import atomic_write, check_input_file, check_output_dir, check_output_file
from verikit.progress import Progress, plural

from .eps import parse_eps_list

_DEFAULT_CHAIN = ("box", "deeppoly", "crown")
# VNN-LIB properties (certify --vnnlib, vnncomp): a complete chain, so hard instances get decided
_DEFAULT_VNN_CHAIN = ("box", "crown", "bab")
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def _floats(text, what):
    if text is None:
        return None
    try:
        vals = [float(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise VerikitError(f"bad {what} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise VerikitError(f"empty {what}")
    if not all(math.isfinite(v) for v in vals):
        raise VerikitError(f"bad {what} {text!r}: values must be finite")
    return vals


def _seconds(value, flag):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise VerikitError(f"{flag} must be a positive number of seconds, got {value:g}")
    return value


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise VerikitError(f"bad --device {device!r}: use cpu, cuda, cuda:1, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VerikitError(f"--device {device}: CUDA is not available on this machine")
    return device


def _set_threads(n):
    if n:  # 0: torch's default (all cores)
        import torch

        torch.set_num_threads(n)


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _flag(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return max(param.opts, key=len)


def _reject_given(ctx: click.Context, names, why: str) -> None:
    bad = [_flag(ctx, n) for n in names if _given(ctx, n)]
    if bad:
        raise VerikitError(f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not apply {why}")


def _domain_names(text, vnn: bool = False, sound: bool = False):
    from verikit.domains import available_domains, parse_domain_list

    if text is None:  # the default chain (in --sound mode: its float-sound domains)
        avail = available_domains()
        return [d for d in (_DEFAULT_VNN_CHAIN if vnn else _DEFAULT_CHAIN)
                if d in avail and (not sound or avail[d].float_sound)]
    if not text.strip(" ,"):
        raise VerikitError(f"--domains is empty; available: {', '.join(available_domains())}")
    names = parse_domain_list(text)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise VerikitError(f"--domains {text!r} names {', '.join(twice)} more than once; each domain runs once "
                           "(a later domain reuses the bounds of the earlier ones)")
    return names


def _chain_config(flags: dict, vnn: bool = False):
    """The ChainConfig for the chain flags, every domain constructed once with its options so
    that a bad option value is reported now, not after hours of work."""
    from verikit.domains import get_domain_class

    from .chain import ChainConfig, check_sound_domains
    from .domain_options import merge_options, parse_domain_options

    domains = _domain_names(flags["domains"], vnn, bool(flags["sound"]))
    if flags["sound"]:
        check_sound_domains(domains)
    _seconds(flags["timeout"], "--timeout")
    _check_device(flags["device"])
    explicit = parse_domain_options(flags["domain_option"], domains)
    shortcuts = {"alpha_steps": flags["alpha_steps"], "solver": flags["milp_solver"], "threads": flags["milp_threads"]}
    options = merge_options(domains, shortcuts, explicit)
    for name in domains:
        get_domain_class(name)(**options[name])
    # VNN-LIB boxes are wide and have few inputs: many cheap parallel starts pay off there
    return ChainConfig(domains=domains, domain_options=options, attack=flags["attack"],
                       attack_steps=flags["attack_steps"] or (100 if vnn else 20),
                       attack_restarts=flags["attack_restarts"] or (200 if vnn else 2), timeout=flags["timeout"],
                       sound=flags["sound"])


def _chain_options(f):
    opts = [
        click.option("--domains", default=None, show_default=False,
                     help="comma list of domains, cheap to exact; see `verikit domains`  "
                          "[default: those of box,deeppoly,crown that are registered]"),
        click.option("--domain-option", "domain_option", multiple=True, metavar="DOMAIN.OPTION=VALUE",
                     help="set any option of a domain in --domains (repeatable), e.g. crown.alpha_lr=0.05, "
                          "milp.tighten=lp"),
        click.option("--timeout", type=float, default=None, help="seconds per sample / per property  [default: none]"),
        click.option("--attack/--no-attack", default=True, help="run PGD before the domains"),
        click.option("--attack-steps", type=click.IntRange(1), default=None, show_default=False,
                     help="PGD steps per start  [default: 20 on datasets, 100 on VNN-LIB properties]"),
        click.option("--attack-restarts", type=click.IntRange(1), default=None, show_default=False,
                     help="PGD starts, run side by side  [default: 2 on datasets, 200 on VNN-LIB properties]"),
        click.option("--alpha-steps", type=click.IntRange(0), default=None, show_default=False,
                     help="alpha-CROWN optimisation steps (same as --domain-option crown.alpha_steps=N)  [default: 0]"),
        click.option("--milp-solver", type=click.Choice(["auto", "highs", "gurobi"]), default=None, show_default=False,
                     help="MILP back-end (milp.solver)  [default: auto]"),
        click.option("--milp-threads", type=click.IntRange(0), default=None, show_default=False,
                     help="MILP solver threads, 0 = the solver's choice (milp.threads)  [default: 1]"),
        click.option("--sound", is_flag=True,
                     help="float-sound mode: proofs also hold for the network as executed in float32 "
                          "(box, deeppoly, crown; other domains are refused)"),
        click.option("--device", default="cpu", help="cpu, cuda, cuda:1, ..."),
        click.option("--threads", type=click.IntRange(0), default=1,
                     help="torch CPU threads; 0 = torch's default (all cores). 1 is fastest for these "
                          "per-sample workloads on a small or busy machine"),
        click.option("--quiet", "-q", is_flag=True, help="no progress output on stderr"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parallel_options(f):
    opts = [
        click.option("--workers", type=int, default=None, show_default=False,
                     help="worker processes on a local Ray instance (needs verikit[ray])  [default: 1, in this "
                          "process; with --ray: every CPU of the cluster]"),
        click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                     help="run on an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT"),
        click.option("--gpus-per-worker", type=float, default=None, show_default=False,
                     help="GPUs each Ray worker takes (its model runs on cuda)  [default: 0]"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parallel(kwargs: dict, threads: int):
    """ParallelOptions for --workers/--ray/--gpus-per-worker (checked now)."""
    from .parallel import check_parallel

    opts = check_parallel(kwargs.pop("workers"), kwargs.pop("ray_address"), kwargs.pop("gpus_per_worker"), threads)
    if opts.enabled and not threads:  # --threads 0: share the cores among the workers
        opts.threads = max(1, (os.cpu_count() or 1) // max(opts.workers, 1))
    return opts


def _ray_session(opts):
    from contextlib import nullcontext

    from .parallel import ray_session

    return ray_session(opts) if opts.enabled else nullcontext()


_CHAIN_FLAGS = ("domains", "domain_option", "timeout", "attack", "attack_steps", "attack_restarts", "alpha_steps",
                "milp_solver", "milp_threads", "sound", "device", "threads", "quiet")


def _split_flags(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in _CHAIN_FLAGS}


def _plot_path(plot):
    if plot is None:
        return None
    if os.path.isdir(str(plot)):
        return check_output_file(plot, "--plot")  # the error for a directory
    ext = os.path.splitext(str(plot))[1].lower().lstrip(".")
    if ext not in PLOT_FORMATS:
        raise VerikitError(f"--plot {plot}: unsupported image format {ext or '(none)'!r}; "
                           f"use a file ending in {', '.join('.' + e for e in PLOT_FORMATS)}")
    return check_output_file(plot, "--plot")


@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--eps", default=None, help="L-inf radius: 0.1, 8/255, or a sweep 1/255,2/255,8/255")
@click.option("--vnnlib", "vnnlib_path", default=None, help="check this VNN-LIB property instead")
@click.option("--result-file", default=None, help="(--vnnlib) write a VNN-COMP result file")
@click.option("--sat-unsat", is_flag=True, help="(--vnnlib) answer sat/unsat instead of violated/holds")
@click.option("--dataset", default="mnist", help="mnist, fashion-mnist, cifar10 or PATH.npz")
@click.option("--split", default="test", type=click.Choice(["test", "train"]))
@click.option("--num-samples", type=click.IntRange(1), default=100)
@click.option("--start", type=click.IntRange(0), default=0, help="index of the first sample")
@click.option("--mean", default=None, help="normalisation mean(s), comma list, if not inside the model")
@click.option("--std", default=None, help="normalisation std(s), comma list, if not inside the model")
@click.option("--data-range", default="0,1", help="valid input range LO,HI (the ball is clipped to it)")
@click.option("--batch-size", type=click.IntRange(1), default=32, help="samples bounded together")
@click.option("--output", "-o", default=None, help="stream per-sample records (JSON lines) here, one per finished sample")
@click.option("--resume", is_flag=True, help="skip the samples --output already holds")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--plot", default=None, help="(eps sweep) save certified accuracy vs eps as .png/.pdf/.svg")
@_chain_options
@_parallel_options
@click.pass_context
def certify(ctx, model, eps, vnnlib_path, result_file, sat_unsat, dataset, split, num_samples, start, mean, std,
            data_range, batch_size, output, resume, as_json, plot, **kwargs):
    """Certify L-inf robustness of test samples of an ONNX MODEL (file or shipped model name),
    or check a VNN-LIB property with --vnnlib.

    Per sample: misclassified -> not certified; else PGD attack (a re-checked counterexample
    falsifies), then the domains in order until one proves robustness.
    Exit codes: 0 ran, 2 bad input, 130 Ctrl-C, 143 SIGTERM (finished records are kept).
    """
    from .model import load_model

    flags = _split_flags(kwargs)
    parallel = _parallel(kwargs, flags["threads"])
    if vnnlib_path is not None:
        _reject_given(ctx, ["eps"], "with --vnnlib (the property gives the input box)")
        _reject_given(ctx, ["dataset", "split", "num_samples", "start", "data_range", "batch_size", "output",
                            "resume", "plot"], "to --vnnlib properties")
        cfg = _chain_config(flags, vnn=True)
        check_input_file(vnnlib_path, "--vnnlib", "VNN-LIB file")
        result_file = check_output_file(result_file, "--result-file") if result_file is not None else None
        mean_v, std_v = _floats(mean, "--mean"), _floats(std, "--std")
        _set_threads(flags["threads"])
        loaded = load_model(model, mean_v, std_v, flags["device"])
        with _ray_session(parallel):
            return _certify_vnnlib(loaded, vnnlib_path, cfg, result_file, sat_unsat, as_json,
                                   (parallel, mean_v, std_v, flags["device"]), progress=not flags["quiet"])
    _reject_given(ctx, ["result_file", "sat_unsat"], "without --vnnlib")
    if eps is None:
        raise VerikitError("give --eps (e.g. --eps 0.1) or --vnnlib PROPERTY")
    if resume and output is None:
        raise VerikitError("--resume needs --output FILE")
    eps_list = parse_eps_list(eps)
    rng = _floats(data_range, "--data-range")
    if len(rng) != 2 or not rng[0] < rng[1]:
        raise VerikitError(f"bad --data-range {data_range!r}: expected LO,HI with LO < HI")
    too_big = [e for e in eps_list if e > rng[1] - rng[0]]
    if too_big:
        raise VerikitError(f"--eps {max(too_big):g} is wider than --data-range {rng[0]:g},{rng[1]:g}: the ball "
                           "would be the whole input range (are the inputs in [0, 255]? use --data-range)")
    if plot is not None and len(eps_list) < 2:
        raise VerikitError("--plot draws certified accuracy versus eps: give several --eps values (e.g. "
                           "--eps 1/255,2/255,4/255)")
    plot = _plot_path(plot)
    output = check_output_file(output, "--output") if output is not None else None
    if dataset.endswith(".npz") or os.path.isdir(dataset):
        check_input_file(dataset, "--dataset", "dataset file")
    cfg = _chain_config(flags)
    mean_v, std_v = _floats(mean, "--mean"), _floats(std, "--std")
    _set_threads(flags["threads"])
    loaded = load_model(model, mean_v, std_v, flags["device"])
    from verikit.data_sources import fit_to_model, load_dataset

    images, labels = load_dataset(dataset, split)
    if start >= len(labels):
        raise VerikitError(f"--start {start} is past the end of the dataset ({plural(len(labels), 'sample')})")
    indices = list(range(start, min(start + num_samples, len(labels))))
    images = fit_to_model(images, loaded.graph.input_shape)
    run = _DatasetRun(loaded, images, labels, indices, eps_list, cfg, tuple(rng), batch_size, output, resume,
                      as_json, plot, progress=not flags["quiet"], argv=original_args(ctx), parallel=parallel,
                      normalisation=(mean_v, std_v), device=flags["device"])
    with _ray_session(parallel):
        run.execute()


@dataclass
class _DatasetRun:
    """One `certify --eps` run over dataset samples: stream records, report, keep finished work."""

    loaded: object  # LoadedModel
    images: object
    labels: object
    indices: list
    eps_list: list
    cfg: object  # ChainConfig
    data_range: tuple
    batch_size: int
    output: Optional[str]
    resume: bool
    as_json: bool
    plot: Optional[str]
    progress: bool
    argv: list
    parallel: object = None  # ParallelOptions
    normalisation: tuple = (None, None)  # (mean, std) as given, for the workers to load the model alike
    device: str = "cpu"
    counts: dict = field(default_factory=dict)

    def _on_done(self, bar, rec):
        if rec is not None:
            self.counts[rec["status"]] = self.counts.get(rec["status"], 0) + 1
        order = ("verified", "falsified", "unknown", "misclassified", "error")
        bar.update(1, ", ".join(f"{self.counts[s]} {s}" for s in order if self.counts.get(s)))

    def execute(self):
        from .records import RecordWriter
        from .report import format_summary, format_sweep, plot_sweep, summarize
        from .robustness import certify_samples, validate_samples

        loaded, cfg = self.loaded, self.cfg
        validate_samples(loaded, self.images, self.labels, self.indices, self.data_range)
        stages = (["attack"] if cfg.attack else []) + list(cfg.domains)
        cfg.onnx_path, cfg.onnx_input = loaded.path, loaded.onnx_input
        writer = RecordWriter(self.output, resume=self.resume, model=loaded.path)
        total = len(self.indices) * len(self.eps_list)
        label = f"certifying ({','.join(stages)})"
        interrupt = None
        try:
            with Progress(total, label, unit="samples", enabled=self.progress) as bar:
                on_done = lambda rec: self._on_done(bar, rec)
                if self.parallel is not None and self.parallel.enabled:
                    from .parallel import certify_samples_parallel

                    certify_samples_parallel(loaded, *self.normalisation, self.device, self.images, self.labels,
                                             self.indices, self.eps_list, cfg, writer, self.data_range,
                                             self.batch_size, self.parallel, on_done=on_done)
                else:
                    certify_samples(loaded, self.images, self.labels, self.indices, self.eps_list, cfg, writer,
                                    self.data_range, self.batch_size, on_done=on_done)
        except KeyboardInterrupt as e:
            interrupt = e
        finally:
            writer.close()
        wanted = {f"{e:.12g}" for e in self.eps_list}
        index_set = set(self.indices)
        recs = [r for r in writer.records if f"{float(r['eps']):.12g}" in wanted and int(r["index"]) in index_set]
        eps_order = {f"{e:.12g}": n for n, e in enumerate(self.eps_list)}  # completion order must not matter
        recs.sort(key=lambda r: (eps_order[f"{float(r['eps']):.12g}"], int(r["index"])))
        summary = summarize(recs, stages)
        if self.as_json:
            click.echo(json.dumps({"model": loaded.path, "domains": list(cfg.domains),
                                   "interrupted": interrupt is not None, "results": summary}, indent=2))
        else:
            click.echo(format_summary(summary), nl=False)
            if len(summary) > 1:
                click.echo(format_sweep(summary), nl=False)
        if interrupt is not None:
            click.echo(self._interrupted_message(interrupt, len(recs), total), err=True)
            sys.exit(exit_code(interrupt))
        if self.plot is not None and summary:
            plot_sweep(summary, self.plot, title=os.path.basename(loaded.path))

    def _interrupted_message(self, interrupt, done: int, total: int) -> str:
        what = "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
        head = f"{what} after {done} of {plural(total, 'sample')}"
        if not self.output:
            return f"{head}; nothing was saved (give --output FILE to keep finished samples)"
        argv = list(self.argv)
        if "--resume" not in argv:
            argv.append("--resume")
        return f"{head}; finished records are in {self.output}; continue with:\n  verikit {shlex.join(argv)}"


def _certify_vnnlib(loaded, vnnlib_path, cfg, result_file, sat_unsat, as_json, parallel=None, progress=False):
    from .vnn import check_property, result_text
    from .vnnlib import load_vnnlib

    prop = load_vnnlib(vnnlib_path)
    cfg.onnx_path, cfg.onnx_input = loaded.path, loaded.onnx_input
    try:
        if parallel is not None and parallel[0].enabled:  # the property's input boxes on Ray workers
            from .parallel import check_property_parallel

            opts, mean, std, device = parallel
            res = check_property_parallel(loaded, mean, std, device, prop, cfg, opts)
        else:
            from .vnn import check_fits

            check_fits(prop, loaded)  # bad input: one error line, before any progress output
            # a bar for the property, whose info line a long search (bab) keeps up to date
            with Progress(1, "property", unit="properties", enabled=progress) as bar:
                res = check_property(loaded, prop, cfg)
                bar.update(1, res.answer)
    except KeyboardInterrupt as e:
        click.echo("interrupted: the property was not decided" + (f"; {result_file} was not written" if result_file
                                                                   else ""), err=True)
        sys.exit(exit_code(e))
    if result_file:
        with atomic_write(result_file) as f:
            f.write(result_text(res, sat_unsat))
    if as_json:
        click.echo(json.dumps({"model": loaded.path, "property": vnnlib_path, "result": res.answer,
                               "seconds": res.seconds, "settled_by": res.by, "note": res.note}))
    else:
        click.echo(result_text(res, sat_unsat).splitlines()[0])
        click.echo(f"({plural(len(prop.cases), 'input box', 'input boxes')}, {res.seconds:.2f} s"
                   + (f", settled by {', '.join(b or '-' for b in res.by)}" if res.by else "")
                   + (f"; {res.note}" if res.note else "") + ")", err=True)


@click.command(context_settings=CONTEXT)
@click.argument("instances")
@click.option("--output", "-o", default="results.csv",
              help="results CSV (benchmark,onnx,vnnlib,result,seconds,expected,agrees,note), one row per finished instance")
@click.option("--benchmark", "benchmarks", multiple=True, help="only these benchmarks (repeatable)")
@click.option("--max-timeout", type=float, default=None, help="cap every instance's timeout (seconds)  [default: none]")
@click.option("--result-dir", default=None, help="also write one VNN-COMP result file per instance")
@click.option("--resume", is_flag=True, help="keep the rows --output already holds and run only the other instances")
@_chain_options
@_parallel_options
@click.pass_context
def vnncomp(ctx, instances, output, benchmarks, max_timeout, result_dir, resume, **kwargs):
    """Run every (onnx, vnnlib, timeout) row of an INSTANCES csv and write a results CSV.

    One row is appended (and flushed) per instance as it finishes. An instance that cannot be
    run (unsupported operator, corrupt model, malformed property, failing domain, an unexpected
    crash) becomes an `error` row; the run goes on. --resume skips the instances already in
    --output (a half-written last line is cut off).
    Exit codes: 0 ran, 1 some answer contradicts the `expected` column, 2 bad input,
    130 Ctrl-C, 143 SIGTERM (finished rows are kept).
    """
    from .benchmark import ResultsCsv, VnncompSettings, normalise_expected, read_results, run_instance, summary_line

    flags = _split_flags(kwargs)
    parallel = _parallel(kwargs, flags["threads"])
    _seconds(max_timeout, "--max-timeout")
    check_input_file(instances, "", "instances file")
    cfg = _chain_config(flags, vnn=True)
    output = check_output_file(output, "--output")
    if resume and os.path.exists(output):
        read_results(output)  # a foreign file is bad input now, not after the work
    result_dir = check_output_dir(result_dir, "--result-dir") if result_dir is not None else None
    rows = normalise_expected(_read(instances, benchmarks), instances)
    _set_threads(flags["threads"])
    if result_dir:
        os.makedirs(result_dir, exist_ok=True)
    settings = VnncompSettings(cfg, device=flags["device"], timeout=flags["timeout"], max_timeout=max_timeout,
                               result_dir=result_dir)
    interrupt = None
    with _ray_session(parallel):
        results = ResultsCsv(output, resume=resume)
        try:
            with Progress(len(rows), "instances", unit="instances", enabled=not flags["quiet"]) as bar:
                def on_row(inst, row):
                    if row["result"] == "error":
                        bar.echo(f"error on {inst['onnx']} {inst['vnnlib']}: {row['note']}")
                    bar.update(1, f"last: {row['result']}")

                todo = [inst for inst in rows if not results.is_done(inst)]
                bar.update(len(rows) - len(todo))
                if parallel.enabled:
                    from .parallel import run_instances_parallel

                    run_instances_parallel(todo, settings, results, parallel, on_row)
                else:
                    models = {}
                    for inst in todo:
                        on_row(inst, _write(results, run_instance(inst, settings, models)))
        except KeyboardInterrupt as e:
            interrupt = e
        finally:
            results.close()
    out_rows = results.rows
    click.echo(summary_line(out_rows, len(rows), any(r["expected"] for r in rows)) + f"; results in {output}")
    wrong = [r for r in out_rows if r["agrees"] == "False"]
    for r in wrong:
        click.echo(f"WRONG ANSWER: {r['onnx']} {r['vnnlib']}: {r['result']} (expected {r['expected']})")
    if interrupt is not None:
        argv = list(original_args(ctx))
        if "--resume" not in argv:
            argv.append("--resume")
        click.echo(f"interrupted after {len(out_rows)} of {plural(len(rows), 'instance')}; the finished rows are "
                   f"in {output}; continue with:\n  verikit {shlex.join(argv)}", err=True)
        sys.exit(exit_code(interrupt))
    if wrong:
        sys.exit(1)


def _write(results, row):
    results.write(row)
    return row


def _read(instances, benchmarks):
    from .vnn import read_instances

    rows = read_instances(instances)
    if benchmarks:
        known = {r["benchmark"] for r in rows}
        bad = [b for b in benchmarks if b not in known]
        if bad:
            has = ", ".join(sorted(k for k in known if k)) or "no benchmark column"
            raise VerikitError(f"--benchmark: unknown benchmark(s) {', '.join(bad)}; {instances} has {has}")
        rows = [r for r in rows if r["benchmark"] in benchmarks]
    return rows
