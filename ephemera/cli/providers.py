"""List the registered provider plugins and whether each can work here."""

from __future__ import annotations

import json

import click


@click.command("providers")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def command(as_json: bool) -> None:
    """List the registered provider plugins and whether each can work here.

    A plugin whose import fails (its SDK is missing) is listed as unusable with the
    package to install, instead of breaking the command line.
    """
    from ephemera.registry import check_provider, list_providers

    rows = []
    for entry in list_providers():
        usable, detail = check_provider(entry.name)
        rows.append({"name": entry.name, "target": entry.target,
                     "distribution": entry.distribution, "usable": usable, "detail": detail})
    if as_json:
        click.echo(json.dumps({"providers": rows}, indent=2))
        return
    if not rows:
        click.echo("no providers registered (entry-point group 'ephemera.providers')")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "yes" if r["usable"] else "no "
        click.echo(f"{r['name']:<{width}}  usable: {mark}  {r['detail']}")
        click.echo(f"{'':<{width}}  {r['target']} ({r['distribution']})")
