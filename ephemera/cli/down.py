"""Finish the teardown of runs from their state files (for an `if: always()` step)."""

from __future__ import annotations

import json
import sys

import click


@click.command("down")
@click.argument("run_ids", nargs=-1)
@click.option("--all", "all_runs", is_flag=True, help="Every run whose state file says it may still be up.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def command(run_ids: tuple[str, ...], all_runs: bool, as_json: bool) -> None:
    """Finish the teardown of runs from their state files (for an `if: always()` step).

    Exits 0 when everything named is verified gone, 5 when something could not be
    verified, 2 when a run id is unknown.
    """
    from ephemera.errors import EXIT_TEARDOWN_FAILED, ConfigError
    from ephemera.registry import get_provider
    from ephemera.settings import get_settings
    from ephemera.state import ACTIVE, list_states, load_state, save_state
    from ephemera.teardown import teardown_run

    settings = get_settings()
    if not run_ids and not all_runs:
        raise ConfigError("name one or more run ids, or pass --all")
    states = []
    if all_runs:
        states = [s for s in list_states(settings.state_dir) if s.status in (*ACTIVE, "teardown-failed")]
    for run_id in run_ids:
        state = load_state(settings.state_dir, run_id)
        if state is None:
            raise ConfigError(f"no state file for run '{run_id}' in {settings.state_dir / 'runs'}")
        states.append(state)
    outcomes = []
    failed = False
    for state in states:
        if state.status == "terminated":
            outcomes.append({"run_id": state.run_id, "verified": True, "detail": "already terminated"})
            continue
        log = (lambda m: None) if as_json else (lambda m, r=state.run_id: click.echo(f"[{r}] {m}", err=True))
        provider = get_provider(state.provider)
        result = teardown_run(provider, state.run_id, state.instance, timeout=600.0, log=log)
        state.status = "terminated" if result.verified else "teardown-failed"
        save_state(settings.state_dir, state)
        if result.verified and state.ssh_key_path:
            import shutil
            from pathlib import Path

            shutil.rmtree(Path(state.ssh_key_path).parent, ignore_errors=True)
        failed |= not result.verified
        outcomes.append({"run_id": state.run_id, "provider": state.provider, "verified": result.verified,
                         "terminated": result.terminated, "problems": result.problems})
    if as_json:
        click.echo(json.dumps({"runs": outcomes}, indent=2))
    else:
        if not outcomes:
            click.echo("nothing to tear down", err=True)
        for o in outcomes:
            click.echo(f"{o['run_id']}: {'gone' if o['verified'] else 'NOT VERIFIED: ' + '; '.join(o['problems'])}",
                       err=True)
    if failed:
        sys.exit(EXIT_TEARDOWN_FAILED)
