"""Show a past run's test results, benchmark figures and gates (from the run history)."""

from __future__ import annotations

import json

import click


def _table(groups: dict[str, dict[str, int]], name: str) -> str:
    from ephemera.results.junit import Counts, text_table

    rows = []
    for key, counts in groups.items():
        c = Counts(**counts)
        rate = "-" if c.pass_rate is None else f"{100 * c.pass_rate:.1f}%"
        rows.append([key, str(c.passed), str(c.failed), str(c.errors), str(c.skipped), rate])
    return text_table([name, "passed", "failed", "errors", "skipped", "pass rate"], rows)


def render(data: dict) -> list[str]:
    from ephemera.results.benchmark import STATS, benchmark_rows, other_rows

    tier = f" ({data['tier']})" if data.get("tier") else ""
    lines = [f"run {data['run_id']}: job {data.get('job') or '?'}{tier}, "
             f"{data.get('status') or 'unknown'}, branch {data.get('branch') or '-'}, "
             f"commit {(data.get('commit') or '-')[:12]}"]
    results = data.get("results") or {}
    if not results:
        lines.append("no test results recorded")
    for grouping in sorted(results, key=lambda g: g == "total"):
        lines += ["", _table(results[grouping], grouping)]
    metrics = data.get("metrics") or {}
    if metrics:
        from ephemera.results.junit import text_table

        lines += ["", text_table(["benchmark", *STATS], benchmark_rows(metrics))]
        lines += [f"{name}: {text}" for name, text in other_rows(metrics)]
    gates = data.get("gates") or []
    if gates:
        lines.append("")
        lines += [("PASS  " if g["passed"] else "FAIL  ") + g["line"] for g in gates]
    return lines


@click.command("results")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def command(run_id: str, as_json: bool) -> None:
    """Show a past run's test results, benchmark figures and gates.

    Exit codes: 0 shown, 2 the run is not in the history.
    """
    from ephemera.errors import ConfigError
    from ephemera.results import history, judgements

    data = judgements.get_judgement(run_id)
    if data is None:
        raise ConfigError(f"run '{run_id}' is not in the history ({history.history_path()})",
                          hint="`ephemera cost --by day` lists what the history holds.")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("\n".join(render(data)))
