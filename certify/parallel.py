"""Certification and VNN-COMP campaigns on Ray: `--workers N` (a local Ray instance with N
worker processes) or `--ray ADDRESS` (an existing cluster).

The driver (this module) owns the output file and the records; Ray tasks (`workers.py`) only
compute and return them. Units of work are the serial run's own batches (certify) or
instances (vnncomp); the driver writes each unit's records as it completes, in completion
order, with the serial run's record format, and every summary is computed from the records,
so a parallel run reports what the serial run reports.

A worker killed mid-task costs that task only: Ray re-runs it (`max_retries` times), and a
task that keeps failing (or raises something other than a VerikitError) becomes `error`
records; a VerikitError (bad input) ends the run as it does serially. Ctrl-C / SIGTERM cancel
what is still running and keep what is written.
"""
from __future__ import annotations

import math
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

from verikit.errors import VerikitError

INSTALL_HINT = 'pip install "verikit[ray]"'
ERROR = "error"
STOP = object()  # returned by an `on_result` callback: the answer is known, cancel the rest


@dataclass
class ParallelOptions:
    workers: int = 1  # local worker processes; with `address`: at most this many tasks at once (0: all CPUs)
    address: Optional[str] = None  # --ray: "auto", HOST:PORT or ray://HOST:PORT
    gpus_per_worker: float = 0.0
    threads: int = 1  # torch threads in each worker
    max_retries: int = 2  # re-runs of a task whose worker died

    @property
    def enabled(self) -> bool:  # otherwise the serial run in this process, without Ray
        return self.workers > 1 or self.address is not None or self.gpus_per_worker > 0


_ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def check_parallel(workers: Optional[int], address: Optional[str], gpus_per_worker: Optional[float],
                   threads: int) -> ParallelOptions:
    """The options of --workers/--ray/--gpus-per-worker, checked before any work (VerikitError)."""
    if workers is not None and workers < 1:
        raise VerikitError(f"--workers must be at least 1, got {workers}")
    if address is not None:
        _check_address(address)
    gpus = 0.0 if gpus_per_worker is None else float(gpus_per_worker)
    if not (math.isfinite(gpus) and gpus >= 0):
        raise VerikitError(f"--gpus-per-worker must be a non-negative number, got {gpus_per_worker}")
    opts = ParallelOptions(workers=workers or (0 if address else 1), address=address, gpus_per_worker=gpus,
                           threads=threads)
    if opts.enabled:
        try:
            import ray  # noqa: F401
        except ImportError:
            what = f"--ray {address}" if address else f"--workers {workers}"
            raise VerikitError(f"{what} needs Ray, which is not installed; install it with: {INSTALL_HINT}") from None
    if gpus and address is None:
        import torch

        if not torch.cuda.is_available():
            raise VerikitError("--gpus-per-worker: no GPU on this machine (CUDA is not available)")
        if gpus * opts.workers > torch.cuda.device_count() + 1e-9:
            raise VerikitError(f"--workers {opts.workers} x --gpus-per-worker {gpus:g} needs more GPUs than the "
                               f"{torch.cuda.device_count()} here")
    return opts


def _check_address(address: str) -> None:
    if address == "auto":
        return
    m = _ADDRESS.match(address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise VerikitError(f"bad --ray address {address!r}: use auto, HOST:PORT (the head's GCS port, 6379 by "
                           "default) or ray://HOST:PORT (Ray client)")
    host = m.group(2).strip("[]")
    try:  # fail now, not after Ray's long reconnect loop
        with socket.create_connection((host, int(m.group(3))), timeout=5):
            pass
    except OSError as e:
        raise VerikitError(f"--ray {address}: nothing answers there ({e.strerror or e}); start the head with "
                           "`ray start --head` and pass the address it prints") from None


@contextmanager
def _ray_messages_to_stderr():
    """Ray prints its error notices (e.g. "A worker died ...") to stdout, which holds the
    command's results (--json): send them to stderr. (A private hook; skipped if it moved.)"""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        yield
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        yield
        return
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: original({**data, "is_err": True}, ignore_prefix)
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


@contextmanager
def ray_session(opts: ParallelOptions):
    """Ray, initialised for this run (and shut down after it) unless it already is."""
    with _ray_messages_to_stderr():
        with _ray_initialised(opts) as ray:
            yield ray


@contextmanager
def _ray_initialised(opts: ParallelOptions):
    import logging

    import ray

    if ray.is_initialized():  # e.g. a notebook or a test that manages its own cluster
        yield ray
        return
    try:
        if opts.address:
            ray.init(address=opts.address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            gpus = math.ceil(opts.gpus_per_worker * opts.workers) if opts.gpus_per_worker else None
            ray.init(num_cpus=opts.workers, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--ray {opts.address}" if opts.address else f"--workers {opts.workers}"
        raise VerikitError(f"{where}: cannot start Ray ({' '.join(str(e).split())[:300]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _concurrency(ray, opts: ParallelOptions) -> int:
    if opts.workers:
        return opts.workers
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus)


def run_units(opts: ParallelOptions, function: Callable, units: Iterable, task_args: Callable,
              on_result: Callable, on_failure: Callable[[object, str], None]) -> None:
    """Run `function(*task_args(unit))` as a Ray task per unit, at most a few more in flight
    than there are workers; `on_result(unit, value)` / `on_failure(unit, message)` run in the
    driver as the tasks complete, in completion order (`on_result` returning STOP cancels
    the units still running or waiting)."""
    with ray_session(opts) as ray:
        from ray.exceptions import RayError, RayTaskError

        remote = ray.remote(function).options(num_cpus=1, num_gpus=opts.gpus_per_worker or 0,
                                              max_retries=opts.max_retries, retry_exceptions=False)
        window = 2 * _concurrency(ray, opts)  # a small queue keeps every worker busy
        todo, pending = iter(units), {}

        def submit():
            while len(pending) < window:
                unit = next(todo, None)
                if unit is None:
                    return
                pending[remote.remote(*task_args(ray, unit))] = unit

        try:
            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    unit = pending.pop(ref)
                    try:
                        value = ray.get(ref)
                    except RayTaskError as e:
                        cause = getattr(e, "cause", None) or e
                        if isinstance(cause, VerikitError):  # bad input: the serial run stops on it too
                            raise VerikitError(str(cause)) from None
                        on_failure(unit, crash_note(cause))
                    except RayError as e:  # the worker died, again and again
                        on_failure(unit, f"worker failed {opts.max_retries + 1} times ({type(e).__name__})")
                    else:
                        if on_result(unit, value) is STOP:
                            return
                submit()
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass


def crash_note(exc: BaseException) -> str:
    from .benchmark import crash_note as note

    return note(exc)


# ---------------------------------------------------------------------------- certify
def error_record(model_name: str, index: int, eps: float, label: int, note: str) -> dict:
    return {"model": model_name, "index": int(index), "eps": float(eps), "label": int(label), "prediction": None,
            "status": ERROR, "by": None, "margin": None, "note": note, "times": {}, "time": 0.0}


def certify_samples_parallel(loaded, mean, std, device: str, images, labels, indices, eps_list, cfg, writer,
                             data_range, batch_size: int, opts: ParallelOptions,
                             on_done: Optional[Callable] = None) -> None:
    """`certify_samples` on Ray workers: the same batches (so the same records), written by
    this process as each batch completes."""
    from .workers import ModelSpec, certify_batch

    spec = ModelSpec(os.path.abspath(loaded.path), loaded.path, tuple(mean) if mean else None,
                     tuple(std) if std else None, "cuda" if opts.gpus_per_worker else device)
    cfg = replace(cfg, onnx_path=None, onnx_input=None)  # each worker sets its own
    units = []
    for eps in eps_list:
        todo = [i for i in indices if not writer.is_done(eps, i)]
        for _ in range(len(indices) - len(todo)):
            if on_done:
                on_done(None)
        units += [(eps, todo[s:s + batch_size]) for s in range(0, len(todo), batch_size)]
    shared = {}

    def task_args(ray, unit):
        if not shared:
            shared.update(spec=ray.put(spec), cfg=ray.put(cfg))
        eps, batch = unit
        return shared["spec"], shared["cfg"], eps, batch, images[batch], labels[batch], tuple(data_range), opts.threads

    def emit(rec):
        writer.write(rec)
        if on_done:
            on_done(rec)

    def on_result(unit, records):
        for rec in records:
            emit(rec)

    def on_failure(unit, note):
        eps, batch = unit
        for i in batch:
            emit(error_record(loaded.path, i, eps, int(labels[i]), note))

    run_units(opts, certify_batch, units, task_args, on_result, on_failure)


# ---------------------------------------------------------------------------- vnncomp
def run_instances_parallel(todo: list, settings, results, opts: ParallelOptions,
                           on_row: Optional[Callable] = None) -> None:
    """The vnncomp instances `todo`, one Ray task each; their rows (to `results`, a ResultsCsv)
    and result files are written here as the instances complete."""
    from .benchmark import instance_row, write_result_file
    from .workers import vnncomp_instance

    remote_settings = replace(settings, device="cuda" if opts.gpus_per_worker else settings.device, result_dir=None)
    shared = {}

    def task_args(ray, inst):
        if not shared:
            shared["settings"] = ray.put(remote_settings)
        inst = {**inst, "onnx_path": os.path.abspath(inst["onnx_path"]),
                "vnnlib_path": os.path.abspath(inst["vnnlib_path"])}
        return inst, shared["settings"], opts.threads

    def finish(inst, row, text):
        write_result_file(inst, settings, text)
        results.write(row)
        if on_row:
            on_row(inst, row)

    def on_result(inst, value):
        row, text = value
        finish(inst, row, text)

    def on_failure(inst, note):
        finish(inst, instance_row(inst, ERROR, 0.0, note), ERROR + "\n")

    run_units(opts, vnncomp_instance, todo, task_args, on_result, on_failure)


# ---------------------------------------------------------------------------- one VNN-LIB property
def check_property_parallel(loaded, mean, std, device: str, prop, cfg, opts: ParallelOptions):
    """`check_property` with the property's cases (input boxes) on Ray workers: violated as
    soon as one case has a re-checked counterexample (the others are cancelled), holds iff
    every case is verified, unknown otherwise. A case whose task fails makes it unknown. Each
    case gets the time left of the property's timeout when it starts."""
    import time

    from .vnn import HOLDS, UNKNOWN, VIOLATED, VnnResult
    from .workers import ModelSpec, vnnlib_case

    t0 = time.perf_counter()
    spec = ModelSpec(os.path.abspath(loaded.path), loaded.path, tuple(mean) if mean else None,
                     tuple(std) if std else None, "cuda" if opts.gpus_per_worker else device)
    done, notes, found = {}, [], []
    shared = {}

    def task_args(ray, k):
        if not shared:
            shared["spec"] = ray.put(spec)
        left = None if cfg.timeout is None else cfg.timeout - (time.perf_counter() - t0)
        one = replace(prop, cases=[prop.cases[k]])
        return shared["spec"], one, replace(cfg, timeout=left, onnx_path=None, onnx_input=None), opts.threads

    def on_result(k, res):
        done[k] = res
        if res.answer == VIOLATED:
            found.append(res)
            return STOP
        if res.note:
            notes.append(res.note)

    def on_failure(k, why):
        done[k] = VnnResult(UNKNOWN, 0.0, [None], note=why)
        notes.append(f"input box {k + 1}: {why}")

    run_units(opts, vnnlib_case, range(len(prop.cases)), task_args, on_result, on_failure)
    seconds = time.perf_counter() - t0
    by = [b for k in sorted(done) for b in done[k].by]
    if found:
        return VnnResult(VIOLATED, seconds, by, found[0].x, found[0].y)
    answer = HOLDS if len(done) == len(prop.cases) and all(r.answer == HOLDS for r in done.values()) else UNKNOWN
    return VnnResult(answer, seconds, by, note="; ".join(sorted(set(notes))))
