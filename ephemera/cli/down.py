"""Finish the teardown of runs from their state files (for an `if: always()` step)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.state import RunState
    from ephemera.lifecycle.teardown import TeardownResult
    from ephemera.spec.settings import Settings


@click.command("down")
@click.argument("run_ids", nargs=-1)
@click.option("--all", "all_runs", is_flag=True, help="Every run whose state file says it may still be up.")
@click.option("--force", is_flag=True,
              help="With --all: also runs whose ephemera process is still going on this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def command(run_ids: tuple[str, ...], all_runs: bool, force: bool, as_json: bool) -> None:
    """Finish the teardown of runs from their state files (for an `if: always()` step).

    With --all, a run whose ephemera process is still running on this machine is left
    to it unless the run has expired or --force is given. A state file that cannot be
    read is skipped with a warning; every other run is still torn down.

    Exits 0 when everything named is verified gone, 5 when something could not be
    verified (or a state file could not be read), 2 when a run id is unknown.
    """
    from ephemera.errors import EXIT_BAD_INPUT, EXIT_TEARDOWN_FAILED, ConfigError
    from ephemera.lifecycle.state import load_state, read_states
    from ephemera.spec.settings import get_settings

    settings = get_settings()
    if not run_ids and not all_runs:
        raise ConfigError("name one or more run ids, or pass --all")
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    states: dict[str, RunState] = {}
    unreadable: list[str] = []
    unknown: list[str] = []
    if all_runs:
        found, unreadable = read_states(settings.state_dir)
        states.update((s.run_id, s) for s in found if s.status != "terminated")
    for run_id in run_ids:
        try:
            state = load_state(settings.state_dir, run_id)
        except ConfigError as exc:
            unreadable.append(exc.message)
            continue
        if state is None:
            unknown.append(run_id)
        else:
            states[run_id] = state
    for problem in unreadable:
        say(f"warning: skipping a state file that cannot be read: {problem}")
    outcomes = [_down_one(state, settings, may_skip=state.run_id not in run_ids and not force,
                          as_json=as_json)
                for state in states.values()]
    if as_json:
        click.echo(json.dumps({"runs": outcomes, "unreadable": unreadable, "unknown": unknown},
                              indent=2))
    else:
        _print(outcomes, unknown, unreadable, settings)
    if unreadable or any(o.get("verified") is False for o in outcomes):
        sys.exit(EXIT_TEARDOWN_FAILED)
    if unknown:
        sys.exit(EXIT_BAD_INPUT)


def _print(outcomes: list[dict[str, Any]], unknown: list[str], unreadable: list[str],
           settings: Settings) -> None:
    if not outcomes and not unknown and not unreadable:
        click.echo("nothing to tear down", err=True)
    for o in outcomes:
        if "skipped" in o:
            text = "skipped: " + o["skipped"]
        elif o["verified"]:
            text = "gone"
        else:
            text = "NOT VERIFIED: " + "; ".join(o["problems"])
        click.echo(f"{o['run_id']}: {text}", err=True)
        for warning in o.get("warnings", []):
            click.echo(f"{o['run_id']}: warning: {warning}", err=True)
    for run_id in unknown:
        click.echo(f"{run_id}: no state file in {settings.state_dir / 'runs'}", err=True)


def _down_one(state: RunState, settings: Settings, *, may_skip: bool,
              as_json: bool) -> dict[str, Any]:
    """Tear down one run; never raises (one failing run must not stop the others)."""
    from ephemera.lifecycle.state import owner_alive
    from ephemera.lifecycle.teardown import teardown_run
    from ephemera.registry import get_provider

    run_id = state.run_id
    if state.status == "terminated":
        return {"run_id": run_id, "verified": True, "detail": "already terminated"}
    if may_skip and owner_alive(state) and not state.expired():
        return {"run_id": run_id, "provider": state.provider,
                "skipped": f"its ephemera process (pid {state.pid}) is still running on this "
                           "machine and the run has not expired; pass --force to tear it down"}
    log = (lambda m: None) if as_json else (lambda m: click.echo(f"[{run_id}] {m}", err=True))
    outcome: dict[str, Any] = {"run_id": run_id, "provider": state.provider, "verified": False,
                               "terminated": [], "problems": [], "warnings": []}
    try:
        provider = get_provider(state.provider)
        result = teardown_run(provider, run_id, state.instance, timeout=600.0, log=log,
                              record=lambda status: _save_status(settings, state, status))
    except Exception as exc:  # noqa: BLE001 - go on with the other runs
        outcome["problems"].append(f"{type(exc).__name__}: {exc}")
        return outcome
    outcome.update(verified=result.verified, terminated=result.terminated,
                   problems=result.problems, warnings=list(result.warnings))
    if result.verified and state.ssh_key_path:
        import shutil

        shutil.rmtree(Path(state.ssh_key_path).parent, ignore_errors=True)
    try:
        _record_history(state, result, provider, settings)
    except Exception as exc:  # noqa: BLE001 - the history is not worth a failed teardown
        outcome["warnings"].append(f"could not record the run in the history "
                                   f"({settings.history_path}): {exc}")
    return outcome


def _save_status(settings: Settings, state: RunState, status: str) -> None:
    from ephemera.lifecycle.state import save_state

    state.status = status
    save_state(settings.state_dir, state)


def _record_history(state: RunState, result: TeardownResult, provider: object,
                    settings: Settings) -> None:
    """Complete the run's history row with the end of its teardown, or add a row for a
    run that created something but never reported (its process was killed)."""
    from types import SimpleNamespace

    from ephemera.results.cost import billed_terms, min_billed_seconds_for
    from ephemera.results.history import RunRecord, billed_seconds, record_teardown

    instance = state.instance
    if instance is None and not result.terminated:
        return  # nothing was created: nothing to bill
    now = datetime.now(UTC)
    ended = now if result.verified else None
    launched = (instance.launched_at if instance and instance.launched_at else None) \
        or state.created_at or state.updated_at
    minimum = min_billed_seconds_for(state.provider, provider)
    # What the provider recorded at launch (market, region, price); nothing: price 0.
    unknown = SimpleNamespace(instance_type=instance.instance_type if instance else "",
                              region=instance.region if instance else None, spot=False,
                              price_per_hour=0.0, price_source="")
    terms = billed_terms(unknown, instance)
    billed = billed_seconds(launched.timestamp(), now.timestamp(), minimum)
    fallback = RunRecord(
        run_id=state.run_id, job=state.job, tier=None, model="", provider=state.provider,
        instance_type=terms["instance_type"], region=terms["region"], status="unfinished",
        exit_code=None, started_at=launched,
        duration_seconds=max(0.0, (now - launched).total_seconds()),
        cost_usd=billed * terms["price_per_hour"] / 3600.0, phases={}, billed_seconds=billed,
        price_per_hour=terms["price_per_hour"], spot=terms["spot"], launched_at=launched,
        ended_at=ended, termination_verified=result.verified)
    record_teardown(state.run_id, ended_at=ended, fallback=fallback, min_billed_seconds=minimum,
                    path=settings.history_path)
