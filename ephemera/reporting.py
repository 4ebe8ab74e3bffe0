"""The end of a run's paperwork, in one call: ``cost.json`` and ``cost.md`` in the
artifacts directory, the history row, and the GitHub step summary.

Each of the three is attempted even when another fails: a locked history database
must not cost the user the cost report, and none of them may hide the run's own
result. Failures come back as messages for the run's log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ephemera.cost import CostReport, write_cost_files


@dataclass
class ReportOutcome:
    cost_json: Path | None = None
    cost_md: Path | None = None
    recorded: bool = False
    step_summary: Path | None = None
    problems: list[str] = field(default_factory=list)


def finish_reports(
    report: CostReport,
    *,
    artifacts_dir: str | os.PathLike[str],
    status: str,
    exit_code: int | None,
    message: str | None = None,
    history_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ReportOutcome:
    """Write the cost files, record the run, append the step summary (when on GitHub).
    ``report`` gets ``status``/``exit_code`` so that all three say the same."""
    from ephemera.history import RunRecord, record_run
    from ephemera.summary import append_step_summary, junit_in, step_summary_markdown

    final = report.with_outcome(status, exit_code)
    outcome = ReportOutcome()
    try:
        outcome.cost_json, outcome.cost_md = write_cost_files(final, artifacts_dir)
    except OSError as exc:
        outcome.problems.append(f"cannot write cost files in {artifacts_dir}: {exc}")
    try:
        record_run(RunRecord.from_report(final), path=history_path)
        outcome.recorded = True
    except Exception as exc:  # noqa: BLE001 - reported, never fatal to the run
        outcome.problems.append(f"cannot record the run in the history: {exc}")
    try:
        markdown = step_summary_markdown(
            run_id=final.run_id, job=final.job, tier=final.tier, status=status,
            exit_code=exit_code, report=final, junit=junit_in(artifacts_dir),
            artifacts_dir=artifacts_dir, message=message, environ=environ)
        outcome.step_summary = append_step_summary(markdown, environ=environ)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal to the run
        outcome.problems.append(f"cannot write the step summary: {exc}")
    return outcome
