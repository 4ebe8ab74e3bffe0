"""Check whether each provider can run jobs on this machine, and why not."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def provider_report(name: str) -> dict[str, Any]:
    """One provider's row: whether it can run here, why (one line), and further lines
    (AWS: the vCPU quotas of the catalog's GPU families) where the provider gives them."""
    from ephemera.errors import ProviderUnavailableError
    from ephemera.registry import check_provider, load_provider_class

    usable, detail = check_provider(name)
    row: dict[str, Any] = {"name": name, "usable": usable, "detail": detail, "details": []}
    if not usable:
        return row
    try:
        details = getattr(load_provider_class(name), "check_details", None)
        row["details"] = [str(line) for line in details()] if details else []
    except ProviderUnavailableError as exc:
        row["details"] = [f"details unavailable: {exc.message}"]
    except Exception as exc:  # noqa: BLE001 - a plugin's details must not break the report
        row["details"] = [f"details unavailable: {type(exc).__name__}: {exc}"]
    return row


@click.command("check")
@click.option("--provider", "only", help="Check this provider only (exit 3 when it cannot run here).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(only: str | None, as_json: bool) -> None:
    """Check whether each provider can run jobs on this machine, and why not.

    One line per provider: credentials and region (aws), the Docker engine and the GPUs
    it sees (docker), the default host's sshd with its pinned key (ssh); for AWS also
    the on-demand and spot vCPU quotas of the catalog's GPU families. Exits 0, or 3
    when the provider named with --provider cannot run here.
    """
    from ephemera.errors import EXIT_INFRA
    from ephemera.registry import load_provider_class, provider_names

    if only:
        load_provider_class(only)  # unknown: a clear error naming it, exit 2
    rows = [provider_report(name) for name in ([only] if only else provider_names())]
    if as_json:
        click.echo(json.dumps({"providers": rows}, indent=2))
    else:
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            mark = "ok" if r["usable"] else "NO"
            click.echo(f"{r['name']:<{width}}  {mark:<2}  {r['detail']}")
            for line in r["details"]:
                click.echo(f"{'':<{width}}      {line}")
    if only and not rows[0]["usable"]:
        sys.exit(EXIT_INFRA)
