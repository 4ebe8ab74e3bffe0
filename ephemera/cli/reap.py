"""Terminate leftover instances whose ephemera labels say they have expired."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click


@click.command("reap")
@click.option("--provider", "providers", multiple=True, help="Only this provider (repeatable). Default: all usable.")
@click.option("--owner", help="Only resources whose owner label is this. Default: the owner setting (yours).")
@click.option("--all-owners", is_flag=True, help="Resources of every owner, not only yours.")
@click.option("--dry-run", is_flag=True, help="List what would be terminated; touch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def command(providers: tuple[str, ...], owner: str | None, all_owners: bool, dry_run: bool,
            as_json: bool) -> None:
    """Terminate leftover instances whose ephemera labels say they have expired.

    Only resources carrying ephemera's labels with an expires-at in the past and
    your owner label (the owner setting; --owner for another, --all-owners for
    every owner) are touched, so it is safe to run with no settings. Resources of
    other owners are counted and left alone.
    """
    from ephemera.errors import EXIT_TEARDOWN_FAILED
    from ephemera.lifecycle.reaper import reap

    owner = _owner(owner, all_owners)
    now = datetime.now(UTC)
    log = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    report = reap(list(providers) or None, owner=owner, dry_run=dry_run, now=now, log=log)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for item in report.expired:
            verb = "would terminate" if dry_run else ("terminated" if item["verified"] else "NOT VERIFIED")
            click.echo(f"{verb}: {item['provider']} {item['id']} (run {item['run_id']}, expired {item['expires_at']})")
        click.echo(f"{len(report.expired)} expired, {report.kept} not expired, "
                   f"{len(report.skipped)} provider(s) skipped", err=True)
        if report.foreign:
            click.echo(f"{report.foreign} resource(s) of other owners than '{owner}' left alone "
                       "(--all-owners to include them)", err=True)
    for where in report.incomplete:
        click.echo(f"search incomplete: {where}", err=True)
    if (any(not item["verified"] for item in report.expired) and not dry_run) or report.incomplete:
        sys.exit(EXIT_TEARDOWN_FAILED)


def _owner(owner: str | None, all_owners: bool) -> str | None:
    """Whose resources to look at: None for every owner's."""
    if all_owners:
        if owner is not None:
            raise click.UsageError("--owner and --all-owners cannot be used together.")
        return None
    if owner is not None:
        if not owner.strip():
            raise click.BadParameter("is empty; leave it out for your own owner label.",
                                     param_hint="--owner")
        return owner
    from ephemera.spec.settings import get_settings

    return get_settings().owner
