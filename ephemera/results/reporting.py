"""The report stage of a run: the history row, cost files in the artifacts directory,
and the GitHub step summary. Each part is best effort: a report that cannot be
written is a warning, never a reason to fail a run that already tore down.

The history row is written first and the cost files next, with SIGINT, SIGTERM and
SIGHUP held for those few milliseconds: a cancelled CI job (which signals again and
again) does not lose what the run cost. A held signal is reported, not re-raised: the
run is over and its process exits right after the report.

Every run that tried a launch gets a row: when the launch raised, the plan's offer is
priced from launch to the verified end of the teardown, unless the teardown's result
shows that nothing was created (then the row says the run cost nothing)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ephemera.results import history
from ephemera.results.cost import PhaseTiming, billed_terms, compute_cost, write_cost_files
from ephemera.results.summary import append_step_summary, junit_in, step_summary_markdown

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run
    from ephemera.lifecycle.records import RunResult

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_held(warn: Callable[[str], None]) -> Iterator[list[int]]:
    """Hold SIGINT, SIGTERM and SIGHUP inside the block (main thread only; elsewhere
    signals cannot arrive in Python code anyway). Yields the list of held signals."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def hold(signum: int, _frame: Any) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in HELD_SIGNALS}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            warn(f"{signal.Signals(signum).name} received while the run's cost and history "
                 "were being saved: saved them first")


def _created_something(run: Run) -> bool:
    """Whether the launch left anything to pay for: the run's instance, or one its
    teardown found by label (``run.teardown_result``). When the teardown's result is not
    known, the launch counts: a cost is never under-reported."""
    if run.instance is not None:
        return True
    teardown = run.teardown_result
    return teardown is None or bool(getattr(teardown, "terminated", None))


def write_reports(run: Run, result: RunResult) -> dict[str, Any] | None:
    offer = run.offer or (run.plan.offer if run.plan is not None else None)
    if offer is None or run.launched_at is None:
        return None
    phases = [PhaseTiming(p.name, p.started_at, p.ended_at) for p in run.phases if p.ended_at is not None]
    plan = run.plan
    report = compute_cost(
        run_id=run.run_id, job=run.job.name, tier=run.loaded.tier, model=run.job.model.id,
        provider=run.provider_name, **billed_terms(offer, run.instance),
        launched_at=run.launched_at if _created_something(run) else None,
        terminated_at=run.terminated_at if result.teardown_verified is not False else None,
        phases=phases, min_billed_seconds=run.caps.min_billed_seconds,
        estimated_cost_usd=plan.expected_cost_usd if plan is not None else None,
        estimated_seconds=run.job.timeout, status=result.status, exit_code=result.exit_code,
    )
    out = report.to_dict()
    with signals_held(run.reporter.warn):
        try:
            history.record_run(history.RunRecord.from_report(report), path=run.settings.history_path)
        except Exception as exc:  # noqa: BLE001 - the history is not worth failing a run over
            run.reporter.warn(f"could not record the run in the history "
                              f"({run.settings.history_path}): {exc}")
        try:
            json_path, md_path = write_cost_files(report, run.artifacts_dir)
            out["files"] = [str(json_path), str(md_path)]
            result.artifacts_dir = str(run.artifacts_dir)
        except OSError as exc:
            run.reporter.warn(f"could not write the cost report: {exc}")
    try:
        markdown = step_summary_markdown(
            run_id=run.run_id, job=run.job.name, status=result.status, exit_code=result.exit_code,
            tier=run.loaded.tier, report=report, junit=junit_in(run.artifacts_dir),
            artifacts_dir=run.artifacts_dir, message=result.message)
        append_step_summary(markdown)
    except Exception as exc:  # noqa: BLE001
        run.reporter.warn(f"could not write the GitHub step summary: {exc}")
    out["usd"] = report.cost_usd
    return out
