"""The report stage of a run: cost files in the artifacts directory, the history row,
and the GitHub step summary. Each part is best effort: a report that cannot be
written is a warning, never a reason to fail a run that already tore down."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.controller import Run, RunResult


def write_reports(run: Run, result: RunResult) -> dict[str, Any] | None:
    from ephemera.cost import (
        PhaseTiming,
        billed_terms,
        compute_cost,
        min_billed_seconds_for,
        write_cost_files,
    )
    from ephemera.history import RunRecord, record_run
    from ephemera.summary import append_step_summary, junit_in, step_summary_markdown

    offer = run.offer
    if offer is None:
        return None
    phases = [PhaseTiming(p.name, p.started_at, p.ended_at) for p in run.phases if p.ended_at is not None]
    plan = run.plan
    report = compute_cost(
        run_id=run.run_id, job=run.job.name, tier=run.loaded.tier, model=run.job.model.id,
        provider=run.provider_name, **billed_terms(offer, run.instance),
        launched_at=run.launched_at,
        terminated_at=run.terminated_at if result.teardown_verified is not False else None,
        phases=phases, min_billed_seconds=min_billed_seconds_for(run.provider_name, run.provider),
        estimated_cost_usd=getattr(plan, "expected_cost_usd", None),
        estimated_seconds=run.job.timeout, status=result.status, exit_code=result.exit_code,
    )
    out = report.to_dict()
    try:
        json_path, md_path = write_cost_files(report, run.artifacts_dir)
        out["files"] = [str(json_path), str(md_path)]
        result.artifacts_dir = str(run.artifacts_dir)
    except OSError as exc:
        run.reporter.warn(f"could not write the cost report: {exc}")
    try:
        record_run(RunRecord.from_report(report), path=run.settings.history_path)
    except Exception as exc:  # noqa: BLE001 - the history is not worth failing a run over
        run.reporter.warn(f"could not record the run in the history ({run.settings.history_path}): {exc}")
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
