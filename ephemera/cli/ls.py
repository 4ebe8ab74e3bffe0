"""List the runs this machine knows: live ones first, then the history."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

HISTORY_ROWS = 20


def _ago(moment: datetime | None, now: datetime) -> str:
    from ephemera.spec.durations import format_duration

    if moment is None:
        return "-"
    seconds = (now - moment).total_seconds()
    return format_duration(seconds) if seconds >= 0 else f"in {format_duration(-seconds)}"


def state_rows(now: datetime) -> tuple[list[dict[str, Any]], list[str]]:
    """A row per state file whose run may still be up; and the unreadable files."""
    from ephemera.lifecycle.state import ACTIVE, owner_alive, read_states
    from ephemera.spec.settings import get_settings

    states, problems = read_states(get_settings().state_dir)
    rows = []
    for state in states:
        if state.status not in ACTIVE:
            continue
        instance = state.instance
        launched = (instance.launched_at if instance else None) or state.created_at
        price = state.extra.get("price_per_hour")
        price = float(price) if isinstance(price, int | float) and not isinstance(price, bool) else None
        seconds = max(0.0, (now - launched).total_seconds()) if launched else 0.0
        alive = owner_alive(state)
        rows.append({
            "run_id": state.run_id, "job": state.job, "live": alive,
            "status": state.status if alive else f"{state.status} (no process: ephemera down)",
            "provider": state.provider,
            "instance": (instance.instance_type or instance.id[:12]) if instance else "-",
            "started_at": launched.isoformat() if launched else None,
            "age": _ago(launched, now),
            "expires_at": state.expires_at.isoformat(),
            "expires": _ago(state.expires_at, now),
            "cost_usd": round(price * seconds / 3600.0, 4) if price is not None else None,
        })
    rows.sort(key=lambda r: r["started_at"] or "", reverse=True)   # newest first,
    rows.sort(key=lambda r: not r["live"])                           # live ones on top
    return rows, problems


def history_rows(now: datetime, limit: int, skip: set[str]) -> list[dict[str, Any]]:
    """The latest ``limit`` runs of the history, newest first (``skip``: shown already)."""
    from ephemera.results.history import history_path, with_retry

    path = history_path()
    if not path.exists() or limit <= 0:
        return []
    sql = ("SELECT run_id, job, status, provider, instance_type, started_at, cost_usd "
           "FROM runs ORDER BY started_at DESC LIMIT ?")
    found = with_retry(path, lambda conn: conn.execute(sql, (limit + len(skip),)).fetchall())
    rows = []
    for run_id, job, status, provider, instance_type, started, cost in found:
        if run_id in skip:
            continue
        moment = (datetime.fromtimestamp(started, UTC)
                  if isinstance(started, int | float) and not isinstance(started, bool) else None)
        rows.append({
            "run_id": run_id, "job": job, "live": False, "status": status,
            "provider": provider, "instance": instance_type or "-",
            "started_at": moment.isoformat() if moment else None, "age": _ago(moment, now),
            "expires_at": None, "expires": "-",
            "cost_usd": round(float(cost), 4) if isinstance(cost, int | float) else None,
        })
    return rows[:limit]


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--limit", default=HISTORY_ROWS, show_default=True, type=click.IntRange(0, 10_000),
              help="How many finished runs of the history to show.")
def command(as_json: bool, limit: int) -> None:
    """List the runs this machine knows: live ones first, then the history.

    Live runs come from the state files (status, provider, instance, age, expiry and
    the cost so far at the plan's price); finished ones from the run history.
    """
    now = datetime.now(UTC)
    live, problems = state_rows(now)
    rows = live + history_rows(now, limit, {r["run_id"] for r in live})
    for problem in problems:
        click.echo(f"warning: skipping a state file that cannot be read: {problem}", err=True)
    if as_json:
        click.echo(json.dumps({"runs": rows}, indent=2))
        return
    if not rows:
        click.echo("no runs known on this machine")
        return
    header = ("RUN", "STATUS", "PROVIDER", "INSTANCE", "AGE", "EXPIRES", "COST")
    table = [header] + [(r["run_id"], r["status"], r["provider"], r["instance"], r["age"],
                         r["expires"], "-" if r["cost_usd"] is None else f"${r['cost_usd']:.4f}")
                        for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
