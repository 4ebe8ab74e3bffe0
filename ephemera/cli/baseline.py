"""Show the baseline a job's benchmark gates compare with, and the runs it is made of."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def _target(job: str, tier: str | None) -> tuple[str, int | None, str | None]:
    """(job name, runs, ref) from a job file, or the name as given."""
    path = Path(job)
    if path.is_file():
        from ephemera.spec.jobfile import load_job

        loaded = load_job(path, tier=tier, check_provider=False)
        spec = loaded.job.gates.baseline
        return loaded.job.name, spec.runs, spec.ref
    return job, None, None


@click.command("baseline")
@click.argument("job")
@click.option("--tier", help="The tier whose runs make the baseline.")
@click.option("--ref", "ref", help="Branch the runs were recorded from (default: the job's "
              "gates.baseline.ref, else this checkout's branch).")
@click.option("--runs", type=click.IntRange(1, 1000), help="How many passing runs (default: the "
              "job's gates.baseline.runs, else 5).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(job: str, tier: str | None, ref: str | None, runs: int | None, as_json: bool) -> None:
    """Show the current baseline of JOB (a job file or a job name) and its runs.

    The baseline of a figure is its median over the last passing runs of the job and
    tier that were recorded from one branch and have benchmark figures.
    """
    from ephemera.results.gates import load_baseline, run_origin
    from ephemera.results.history import history_path

    name, job_runs, job_ref = _target(job, tier)
    branch = ref if ref is not None else job_ref if job_ref is not None else run_origin(Path.cwd())[0]
    count = runs or job_runs or 5
    baseline = load_baseline(name, tier, branch, count, exclude=None)
    data = {"job": name, "tier": tier, "runs_wanted": count, **baseline.to_dict()}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    where = f"job {name}" + (f" tier {tier}" if tier else "") + f" on branch '{branch or '(none)'}'"
    if not baseline.runs:
        click.echo(f"no baseline for {where}: no passing run with benchmark figures "
                   f"in the history ({history_path()})")
        return
    from ephemera.results.benchmark import figure_text

    click.echo(f"baseline of {where}: median of the last {len(baseline.runs)} passing run(s) "
               f"(of {count} wanted)")
    for metric, value in data["median"].items():
        click.echo(f"  {metric:<22} {figure_text(metric, value)}")
    click.echo("runs:")
    for run in baseline.runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run["started_at"]))
        click.echo(f"  {run['run_id']}  {started}Z  commit {(run['commit'] or '-')[:12]}")
