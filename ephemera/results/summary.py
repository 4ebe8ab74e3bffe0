"""The run's summary for GitHub Actions: result, test counts, cost, phases, links,
and the run's results, benchmark and gates (``results.md`` in its artifacts).

Test counts come from the JUnit XML files the suite left in the artifacts, read by
:mod:`ephemera.results.junit` (bounded and hardened: reading them never fails the run; a
file that is not JUnit XML is named in the summary and skipped). The summary is
appended to ``$GITHUB_STEP_SUMMARY`` only when that variable is set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ephemera.results.cost import CostReport, phases_table, seconds_text, usd
from ephemera.results.junit import (  # noqa: F401 - the JUnit reader's names, kept importable here
    JUnitTotals,
    find_junit_files,
    junit_in,
    parse_junit,
    parse_junit_file,
)

RESULTS_FILE = "results.md"
_MAX_RESULTS_MD = 256 * 1024

def run_url(environ: Mapping[str, str] | None = None) -> str | None:
    """Link to the workflow run (where the uploaded artifacts are), when on GitHub."""
    env = os.environ if environ is None else environ
    server, repo, run_id = (env.get("GITHUB_SERVER_URL"), env.get("GITHUB_REPOSITORY"),
                            env.get("GITHUB_RUN_ID"))
    if server and repo and run_id:
        return f"{server.rstrip('/')}/{repo}/actions/runs/{run_id}"
    return None


_ICON = {"passed": "✅", "failed": "❌", "error": "⚠️", "timeout": "⏱️", "interrupted": "🛑"}


def step_summary_markdown(
    *,
    run_id: str,
    job: str,
    status: str,
    exit_code: int | None,
    tier: str | None = None,
    report: CostReport | None = None,
    junit: JUnitTotals | None = None,
    artifacts_dir: str | os.PathLike[str] | None = None,
    message: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The Markdown block for one run: result, tests, cost, phases, links."""
    icon = _ICON.get(status, "•")
    title = f"### {icon} ephemera `{job}`" + (f" ({tier})" if tier else "") + f": {status}"
    lines = [title, ""]
    lines.append(f"- Run: `{run_id}`" + (f", exit code {exit_code}" if exit_code is not None else ""))
    if message:
        lines.append(f"- Reason: {message}")
    if junit is not None and junit.found:
        lines.append(f"- Tests: {junit.passed} passed, {junit.failures} failed, "
                     f"{junit.errors} errors, {junit.skipped} skipped ({junit.tests} total)")
    elif junit is not None:
        lines.append("- Tests: no JUnit XML report found")
    if junit is not None:
        for problem in junit.problems:
            lines.append(f"- ⚠️ {problem}")
    if report is not None:
        market = "spot" if report.spot else "on-demand"
        estimate = (f" (estimate {usd(report.estimated_cost_usd)})"
                    if report.estimated_cost_usd is not None else "")
        lines.append(f"- Cost: **{usd(report.cost_usd)}**{estimate} for "
                     f"{seconds_text(report.billed_seconds)} of {report.provider} "
                     f"{report.instance_type} ({market}, {usd(report.price_per_hour)}/h, "
                     f"{report.price_source or 'price source unknown'})")
        if not report.termination_verified and report.launched_at:
            lines.append("- ⚠️ Termination of the machine was not verified: it may still be "
                         "billing. The cleanup step runs `ephemera down --all`.")
    url = run_url(environ)
    if url:
        lines.append(f"- Artifacts: [workflow run]({url}#artifacts)")
    elif artifacts_dir is not None:
        lines.append(f"- Artifacts: `{artifacts_dir}`")
    judged = _results_markdown(artifacts_dir)
    if judged:
        lines += ["", judged]
    if report is not None and report.rows():
        lines += ["", "<details><summary>Time and cost by phase</summary>", "",
                  phases_table(report), "", "</details>"]
    return "\n".join(lines) + "\n\n"


def _results_markdown(artifacts_dir: str | os.PathLike[str] | None) -> str:
    """The run's ``results.md`` (results table, benchmark, gates), written by the run
    itself before its report; empty when there is none."""
    if artifacts_dir is None:
        return ""
    path = Path(artifacts_dir) / RESULTS_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_RESULTS_MD:
            return ""
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def append_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Append to ``$GITHUB_STEP_SUMMARY`` when it is set; return the file, else None.
    A summary that cannot be written is not worth failing a run over: the error is
    returned to the caller's log as None plus a warning on stderr."""
    env = os.environ if environ is None else environ
    target = env.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(markdown)
    except OSError as exc:
        print(f"ephemera: warning: cannot write the step summary to {path}: {exc}", file=sys.stderr)
        return None
    return path
