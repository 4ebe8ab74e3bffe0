"""Compare two past runs side by side: pass rates, flipped tests, latency, cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def find_artifacts(run_id: str, root: Path) -> Path | None:
    """A run's artifacts directory: ROOT/RUN_ID, or ROOT/GROUP/VARIANT for a variant of
    an A/B run (whose id is GROUP-VARIANT)."""
    direct = root / run_id
    if direct.is_dir():
        return direct
    if not root.is_dir():
        return None
    for group in root.iterdir():
        if group.is_dir() and run_id.startswith(group.name + "-"):
            candidate = group / run_id[len(group.name) + 1:]
            if candidate.is_dir():
                return candidate
    return None


def _shared_cost(artifacts: Path, run_id: str) -> float | None:
    """A same-machine variant's share of its machine's cost, from the A/B run's compare.json."""
    from ephemera.results.compare import COMPARE_JSON

    try:
        data = json.loads((artifacts.parent / COMPARE_JSON).read_text(encoding="utf-8"))
        for entry in data.get("variants", []):
            if entry.get("run_id") == run_id and isinstance(entry.get("cost_usd"), int | float):
                return float(entry["cost_usd"])
    except (OSError, ValueError, AttributeError):
        pass
    return None


def load_side(run_id: str, group_by: str | None) -> Any:
    from ephemera.errors import ConfigError
    from ephemera.results import history, judgements
    from ephemera.results.compare import Side, counts_from_history, side_from_artifacts
    from ephemera.spec.settings import get_settings

    stored = judgements.get_judgement(run_id)
    row = history.get_run(run_id)
    artifacts = find_artifacts(run_id, get_settings().artifacts_dir)
    if stored is None and row is None and artifacts is None:
        raise ConfigError(f"run '{run_id}' is neither in the history ({history.history_path()}) "
                          f"nor in the artifacts directory ({get_settings().artifacts_dir})",
                          hint="`ephemera cost --by day` lists what the history holds.")
    if artifacts is not None:
        side = side_from_artifacts(run_id, artifacts, group_by=group_by)
    else:
        side = Side(name=run_id)
        side.problems.append("no artifacts directory: pass rates and figures from the history only")
    if side.overall is None and stored:
        side.overall, side.groups = counts_from_history(stored.get("results") or {}, group_by)
    if not side.metrics and stored:
        side.metrics = dict(stored.get("metrics") or {})
    side.run_id = run_id
    if row:
        side.status, side.instance = row.get("status"), row.get("instance_type")
        side.cost_usd = row.get("cost_usd")
    shared = _shared_cost(artifacts, run_id) if artifacts is not None else None
    if shared is not None:
        side.cost_usd = shared
    return side


def _grouping(run_a: str, run_b: str) -> str | None:
    from ephemera.results import judgements

    found = []
    for run_id in (run_a, run_b):
        stored = judgements.get_judgement(run_id) or {}
        found.append([g for g in (stored.get("results") or {}) if g != "total"])
    common = [g for g in found[0] if g in found[1]]
    return common[0] if common else None


@click.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
def command(run_a: str, run_b: str, as_json: bool, seed: int) -> None:
    """Compare two past runs side by side: pass rates, flipped tests, latency, cost.

    RUN_B is compared with RUN_A: pass rate differences overall and per group, the tests
    that flipped with McNemar's exact p-value, benchmark figures with their ratio and a
    bootstrap confidence interval of the e2e P90 ratio. Exit codes: 0 shown, 2 a run is
    unknown.
    """
    from ephemera.results.compare import compare_sides, text_lines
    from ephemera.spec.job import CompareSpec

    group_by = _grouping(run_a, run_b)
    sides = [load_side(run_a, group_by), load_side(run_b, group_by)]
    comparison = compare_sides(sides, CompareSpec(seed=seed))
    if as_json:
        click.echo(json.dumps(comparison.to_dict(), indent=2))
        return
    click.echo("\n".join(text_lines(comparison)))
