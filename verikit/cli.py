"""The `verikit` command line: a thin layer that parses arguments and calls the library.

Every error a user can cause ends in ONE line on stderr, `error: ...`, and exit code 2: a
`VerikitError` (bad file, bad value, unsupported op, ...) as well as click's usage errors
(unknown flag, bad number, ...), which click would print as several lines. Ctrl-C exits with
130 and SIGTERM with 143 (commands that write results keep what they finished); warnings are
printed as one `warning: ...` line, above the progress bar.
"""
from __future__ import annotations

import errno
import importlib
import os
import sys
import warnings

import click

from .errors import VerikitError
from .interrupts import exit_code, sigterm_raises

# sub-commands that live with their feature: name -> "module:attribute"
_LAZY_COMMANDS = {
    "certify": "verikit.certify.cli:certify",
    "vnncomp": "verikit.certify.cli:vnncomp",
    "train": "verikit.train.cli:train",
    "models": "verikit.models.cli:models",
}
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_error_line(e: click.ClickException) -> str:
    msg = _one_line(e.format_message())
    msg = msg[:1].lower() + msg[1:]
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {msg}{hint}"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from .progress import echo_above_progress

    echo_above_progress(f"warning: {_one_line(message)}")


class _Group(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in _LAZY_COMMANDS:
            mod, attr = _LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(mod), attr)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with verikit's error contract (see the module docstring)."""
        if args is None and standalone_mode:  # the real console script (not a test runner)
            from verikit.allocator import keep_freed_memory_from_env

            keep_freed_memory_from_env()  # large tensors reuse mapped pages (allocator.py)
            try:
                return self._main(list(sys.argv[1:]), prog_name, complete_var, standalone_mode, **extra)
            except SystemExit as e:
                if e.code in (130, 143):
                    # interrupted: everything is saved and closed; skip torch's slow interpreter
                    # teardown (seconds on a busy machine) so that Ctrl-C ends the process at once
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(e.code)
                raise
        return self._main(list(args or []), prog_name, complete_var, standalone_mode, **extra)

    def _main(self, args, prog_name, complete_var, standalone_mode, **extra):
        saved_warning = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            with sigterm_raises():
                rv = super().main(args, "verikit", complete_var, standalone_mode=False,
                                  **{"obj": {"argv": args}, **extra})
        except click.exceptions.Exit as e:
            rv = e.exit_code
        except click.ClickException as e:
            click.echo(_usage_error_line(e), err=True)
            sys.exit(2)
        except VerikitError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
        except click.Abort as e:  # click turns KeyboardInterrupt into Abort
            cause = e.__cause__ or e.__context__ or KeyboardInterrupt()
            click.echo("interrupted", err=True)
            sys.exit(exit_code(cause))
        except KeyboardInterrupt as e:
            click.echo("interrupted", err=True)
            sys.exit(exit_code(e))
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            # output piped into `head`: stop quietly (and let the exit-time flush write nowhere)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        finally:
            warnings.showwarning = saved_warning
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def original_args(ctx: click.Context) -> list:
    """The command line as typed, for messages such as the resume command."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    return list(obj.get("argv") or [])


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="verikit")
def main():
    """verikit: neural-network verification (box, deeppoly, crown, milp) and SABR training.

    Exit codes: 0 success, 1 vnncomp: an answer contradicts `expected`, 2 bad input
    (missing/corrupt model, bad flag or value, unsupported op, ...: one `error:` line),
    130 interrupted by Ctrl-C, 143 stopped by SIGTERM (finished results are kept).
    """


@main.command()
def domains():
    """List the registered bound domains (built-in and plug-ins)."""
    from verikit.domains import available_domains

    rows = [(n, "yes" if c.complete else "no", "yes" if c.differentiable else "no", c.description)
            for n, c in available_domains().items()]
    w = max(len(r[0]) for r in rows)
    click.echo(f"{'name':<{w}}  complete  differentiable  description")
    for n, comp, diff, desc in rows:
        click.echo(f"{n:<{w}}  {comp:<8}  {diff:<14}  {desc}")


@main.command()
@click.option("--options", "show_options", is_flag=True, help="also list every option: default, paper value, meaning")
def methods(show_options):
    """List the registered training methods (built-in and plug-ins) for `verikit train --method`."""
    from verikit.train.methods import available_methods

    rows = available_methods()
    w = max(len(n) for n in rows)
    click.echo(f"{'name':<{w}}  options{' ' * 18}description")
    for n, c in rows.items():
        opts = ", ".join(f"{k}={o.default}" for k, o in c.options.items()) or "-"
        click.echo(f"{n:<{w}}  {opts:<25}  {c.description}")
        if show_options:
            if c.paper:
                click.echo(f"{'':<{w}}    paper: {c.paper}")
            for k, o in c.options.items():
                click.echo(f"{'':<{w}}    {k} (default {o.default}): {o.help}" + (f"; paper: {o.paper}" if o.paper else ""))


@main.command()
@click.argument("model")
@click.option("--check/--no-check", default=True, show_default=True, help="compare with onnxruntime node by node")
@click.option("--samples", type=click.IntRange(1), default=4, show_default=True, help="random inputs for the check")
@click.option("--graph", "show_graph", is_flag=True, help="print every IR node")
@click.option("--threads", type=click.IntRange(0), default=1, show_default=True,
              help="torch CPU threads (0: torch's default, all cores)")
def info(model, check, samples, show_graph, threads):
    """Describe an ONNX MODEL and check its import against onnxruntime."""
    import onnx

    from .onnx_check import compare_with_onnxruntime
    from .onnx_import import from_onnx, load_onnx_model

    from verikit.certify.model import resolve_model_path

    from .progress import plural

    path = resolve_model_path(model)
    proto = load_onnx_model(path)
    _set_threads(threads)
    graph = from_onnx(proto)
    graph.source = path
    dims = lambda vi: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
    inits = {t.name for t in proto.graph.initializer}
    click.echo(f"model: {path}")
    for i in proto.graph.input:
        if i.name not in inits:
            click.echo(f"input:  {i.name} {dims(i)}")
    for o in proto.graph.output:
        click.echo(f"output: {o.name} {dims(o)}")
    onnx_counts: dict[str, int] = {}
    for n in proto.graph.node:
        onnx_counts[n.op_type] = onnx_counts.get(n.op_type, 0) + 1
    click.echo("ONNX ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(onnx_counts.items())))
    click.echo("IR ops:   " + ", ".join(f"{k} x{v}" for k, v in sorted(graph.op_counts().items())))
    click.echo(f"parameters: {graph.num_parameters():,}")
    if show_graph:
        click.echo(graph.summary())
    if check:
        rep = compare_with_onnxruntime(path, graph, num_inputs=samples)
        worst = max(rep.per_node, key=lambda r: r[2]) if rep.per_node else None
        click.echo(f"onnxruntime check: {plural(len(rep.per_node), 'tensor')} compared on "
                   f"{plural(samples, 'random input')}, "
                   f"max relative error {rep.max_rel_error:.2e}" + (f" (at {worst[0]})" if worst else ""))
        if rep.problem(1e-4):
            raise VerikitError(f"import disagrees with onnxruntime: {rep.problem(1e-4)}")


def _set_threads(n: int) -> None:
    """--threads: 0 leaves torch's default (all cores); 1 is fastest on a small busy machine."""
    if n:
        import torch

        torch.set_num_threads(n)


if __name__ == "__main__":
    main()
