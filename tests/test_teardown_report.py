"""The report after the teardown: a signal (or two) arriving while it is written does
not lose the history row or the cost files, and a run whose launch raised still gets
its cost. A real Run of the local CPU job, its report written by the real code into a
real history database; only the run's timeline is set by the test."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ephemera.lifecycle.controller import Run
from ephemera.lifecycle.records import PhaseRecord
from ephemera.lifecycle.teardown import TeardownResult
from ephemera.progress import Reporter
from ephemera.provider import Instance, InstanceState
from ephemera.results import history
from ephemera.results.reporting import write_reports
from ephemera.spec.jobfile import load_job
from ephemera.spec.settings import get_settings

JOB = Path(__file__).resolve().parent.parent / "jobs" / "local-cpu-smoke.yaml"
PRICE = 36.0   # $/h: 1 cent a second


class _Warnings(Reporter):
    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        super().warn(message)


def _finished_run(*, launched: bool = True) -> tuple[Run, object]:
    """A run that launched 100 s ago and was verified gone just now."""
    run = Run(load_job(JOB), settings=get_settings(), reporter=_Warnings())
    plan = run.make_plan()
    run.plan = replace(plan, offer=replace(plan.offer, price_per_hour=PRICE))
    end = datetime.now(UTC)
    start = end - timedelta(seconds=100)
    run.launched_at = start
    run.terminated_at = end
    run.phases = [PhaseRecord("provision", start, start + timedelta(seconds=10), True),
                  PhaseRecord("teardown", end - timedelta(seconds=5), end, True)]
    if launched:
        run.offer = run.plan.offer
        run.instance = Instance(provider="local", id="local-x", run_id=run.run_id,
                                state=InstanceState.TERMINATED)
    result = run._result("passed", 0, "the suite passed")
    result.teardown_verified = True
    return run, result


@pytest.mark.timeout(60)
def test_signals_during_the_report_do_not_lose_the_history_row_or_the_cost(monkeypatch):
    run, result = _finished_run()
    real_record_run = history.record_run

    def record_run_while_cancelled(*args, **kwargs):
        # A cancelled CI job: SIGINT, and another one before the first is handled.
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_record_run(*args, **kwargs)

    monkeypatch.setattr(history, "record_run", record_run_while_cancelled)
    try:
        out = write_reports(run, result)
    except KeyboardInterrupt:
        pytest.fail("a signal during the report stopped it before the history row was written")
    row = history.get_run(run.run_id)
    assert row is not None and row["status"] == "passed"
    assert row["cost_usd"] == pytest.approx(1.0) and row["termination_verified"] == 1
    assert row["ended_at"] == pytest.approx(run.terminated_at.timestamp(), abs=0.001)
    cost = json.loads((run.artifacts_dir / "cost.json").read_text())
    assert cost["cost_usd"] == pytest.approx(1.0) and out["usd"] == pytest.approx(1.0)
    assert any("SIGINT received" in w for w in run.reporter.warnings)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored


@pytest.mark.timeout(60)
def test_a_run_whose_launch_raised_after_creating_an_instance_gets_a_cost():
    run, result = _finished_run(launched=False)                 # no offer, no instance
    run.teardown_result = TeardownResult(verified=True, terminated=["local-found-by-label"])
    out = write_reports(run, result)
    assert out is not None and out["usd"] == pytest.approx(1.0)
    row = history.get_run(run.run_id)
    assert row["cost_usd"] == pytest.approx(1.0) and row["billed_seconds"] == 100


@pytest.mark.timeout(60)
def test_a_launch_that_created_nothing_is_recorded_at_no_cost():
    run, result = _finished_run(launched=False)
    run.teardown_result = TeardownResult(verified=True, terminated=[])
    out = write_reports(run, result)
    assert out is not None and out["usd"] == 0
    row = history.get_run(run.run_id)
    assert row["cost_usd"] == 0 and row["status"] == "passed"
