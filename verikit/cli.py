"""The `verikit` command line: a thin layer that parses arguments and calls the library.

Every `VerikitError` (bad file, bad flag value, unsupported op, ...) becomes a one-line
message on stderr and exit code 2; usage errors from click also exit with 2.
"""
from __future__ import annotations

import importlib
import sys

import click

from .errors import VerikitError

# sub-commands that live with their feature: name -> "module:attribute"
_LAZY_COMMANDS = {
    "certify": "verikit.certify.cli:certify",
    "vnncomp": "verikit.certify.cli:vnncomp",
    "train": "verikit.train.cli:train",
    "models": "verikit.models.cli:models",
}


class _Group(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in _LAZY_COMMANDS:
            mod, attr = _LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(mod), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VerikitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="verikit")
def main():
    """verikit: neural-network verification (box, deeppoly, crown, milp) and SABR training.

    Exit codes: 0 success, 2 bad input (missing/corrupt model, bad flag, unsupported op, ...).
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
@click.argument("model")
@click.option("--check/--no-check", default=True, show_default=True, help="compare with onnxruntime node by node")
@click.option("--samples", default=4, show_default=True, help="random inputs for the check")
@click.option("--graph", "show_graph", is_flag=True, help="print every IR node")
def info(model, check, samples, show_graph):
    """Describe an ONNX MODEL and check its import against onnxruntime."""
    import onnx

    from .onnx_check import compare_with_onnxruntime
    from .onnx_import import from_onnx, load_onnx_model

    from verikit.certify.model import resolve_model_path

    path = resolve_model_path(model)
    proto = load_onnx_model(path)
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
        click.echo(f"onnxruntime check: {len(rep.per_node)} tensors compared on {samples} random inputs, "
                   f"max relative error {rep.max_rel_error:.2e}" + (f" (at {worst[0]})" if worst else ""))
        if rep.max_rel_error > 1e-4:
            raise VerikitError(f"import disagrees with onnxruntime (relative error {rep.max_rel_error:.2e})")


if __name__ == "__main__":
    main()
