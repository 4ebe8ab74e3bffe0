"""Show what runs cost (from the run history), or import cost.json files into it."""

from __future__ import annotations

import json
import re

import click

from ephemera.errors import ConfigError

GROUPINGS = ("job", "tier", "model", "instance", "day", "provider")
_DAYS = re.compile(r"^\s*(\d+(?:\.\d+)?)d(.*)$", re.IGNORECASE)


def parse_since(value: str) -> float | None:
    """Seconds for ``--since``: the job-file durations (90s, 20m, 1h30m) plus days
    (30d, 1d12h); ``all`` for the whole history."""
    from ephemera.spec.durations import parse_duration

    text = value.strip()
    if text.lower() == "all":
        return None
    match = _DAYS.match(text)
    try:
        if match:
            days = float(match.group(1)) * 86400
            rest = match.group(2).strip()
            seconds = days + (parse_duration(rest) if rest else 0.0)
        else:
            seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}; days (7d, 30d) and 'all' work too") from None
    if seconds <= 0:
        raise ConfigError(f"--since: a duration must be positive, found '{value}'")
    return seconds


def _table(rows: list[dict], by: str) -> str:
    headers = [by, "runs", "passed", "pass rate", "cost", "mean duration"]
    from ephemera.results.cost import seconds_text, usd

    body = [[r["key"], str(r["runs"]), str(r["passed"]), f"{100 * r['pass_rate']:.0f}%",
             usd(r["cost_usd"]), seconds_text(r["mean_duration_seconds"])] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = []
    for row in [headers, *body]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@click.command("cost")
@click.option("--since", "since", default="30d", show_default=True, metavar="DURATION",
              help="Only runs that started this long ago or later (e.g. 7d, 12h, all).")
@click.option("--by", "by", type=click.Choice(GROUPINGS), default="job", show_default=True,
              help="Group runs by this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--import", "do_import", is_flag=True,
              help="Merge the given cost.json files (or directories holding them) into the history.")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=True))
def command(since: str, by: str, as_json: bool, do_import: bool, files: tuple[str, ...]) -> None:
    """Show what runs cost, grouped, from the run history.

    With --import FILE..., merge cost.json files from CI artifacts into the history
    first (a run already present is kept as it is).
    """
    from ephemera.results import history

    if files and not do_import:
        raise ConfigError("FILES are only read with --import",
                          hint="Run `ephemera cost --import FILE...`.")
    if do_import:
        if not files:
            raise ConfigError("--import needs at least one cost.json file or directory")
        result = history.import_cost_files(files)
        if as_json:
            click.echo(json.dumps({"imported": result.added, "already_present": result.already_present,
                                   "files": result.files}))
        else:
            click.echo(f"imported {result.added} run(s) from {result.files} file(s); "
                       f"{result.already_present} already in the history "
                       f"({history.history_path()})")
        return

    seconds = parse_since(since)
    groups = history.summarize(seconds, by)
    total = history.summarize(seconds, None)
    rows = [g.__dict__ for g in groups]
    total_row = total[0].__dict__ if total else {
        "key": "all", "runs": 0, "passed": 0, "failed": 0, "pass_rate": 0.0, "cost_usd": 0.0,
        "mean_duration_seconds": 0.0, "billed_seconds": 0.0}
    if as_json:
        click.echo(json.dumps({"since": since, "since_seconds": seconds, "by": by,
                               "groups": rows, "total": total_row}, indent=2))
        return
    if not rows:
        click.echo(f"no runs in the history since {since} ({history.history_path()})")
        return
    click.echo(_table(rows, by))
    from ephemera.results.cost import usd

    click.echo(f"\ntotal: {total_row['runs']} run(s), {usd(total_row['cost_usd'])}, "
               f"pass rate {100 * total_row['pass_rate']:.0f}% (since {since})")
