"""`verikit models`: list the trained models shipped with verikit."""
from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--paths", is_flag=True, help="also print each model's file path")
def models(paths):
    """List the shipped models; pass a NAME to `verikit certify NAME --eps ...`."""
    from .zoo import list_models

    rows = list_models()
    if not rows:
        click.echo("no models shipped")
        return
    click.echo(f"{'name':<17} {'method':<8} {'eps':>5} {'λ':>4} {'arch':<10} {'clean':>6} {'size':>7}  description")
    for m in rows:
        clean = m.get("clean_acc", m.get("clean_acc_first500"))  # campaign models: on the first 500
        lam = m.get("lambda", (m.get("options") or {}).get("lambda"))
        click.echo(f"{m['name']:<17} {m.get('method', '?'):<8} {m.get('eps', float('nan')):>5g} "
                   f"{'' if lam is None else format(lam, 'g'):>4} {m.get('architecture', '?'):<10} "
                   f"{'' if clean is None else format(clean, '.3f'):>6} {str(m.get('size_kb', '?')) + ' KB':>7}  "
                   f"{m.get('description', '')}")
        if paths:
            click.echo(f"    {m['path']}")
