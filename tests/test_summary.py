"""JUnit XML counting (several files, odd shapes, malformed files) and the GitHub step
summary (written only when $GITHUB_STEP_SUMMARY is set, appended, with links)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ephemera.results.cost import CIContext, PhaseTiming, compute_cost
from ephemera.results.summary import (
    append_step_summary,
    junit_in,
    parse_junit,
    parse_junit_file,
    run_url,
    step_summary_markdown,
)

PYTEST_STYLE = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="t" name="a" time="0.1"/>
<testcase classname="t" name="b" time="0.1"><failure message="boom">trace</failure></testcase>
<testcase classname="t" name="c" time="0.1"><error message="setup">trace</error></testcase>
<testcase classname="t" name="d" time="0.1"><skipped message="gpu"/></testcase>
<testcase classname="t" name="e" time="0.1"><system-out>hi</system-out></testcase>
</testsuite></testsuites>
"""

BARE_SUITE_ATTRS_ONLY = '<testsuite name="x" tests="10" failures="2" errors="0" skip="3"/>'

NESTED = """<testsuites>
 <testsuite name="outer">
  <testsuite name="inner1"><testcase name="a"/><testcase name="b"><failure/></testcase></testsuite>
  <testsuite name="inner2"><testcase name="c"><skipped/></testcase></testsuite>
 </testsuite>
</testsuites>"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_pytest_junit_counts(tmp_path):
    totals = parse_junit_file(write(tmp_path, "junit.xml", PYTEST_STYLE))
    assert (totals.tests, totals.failures, totals.errors, totals.skipped) == (5, 1, 1, 1)
    assert totals.passed == 2 and totals.found and not totals.problems


def test_attribute_only_and_nested_suites(tmp_path):
    bare = parse_junit_file(write(tmp_path, "bare.xml", BARE_SUITE_ATTRS_ONLY))
    assert (bare.tests, bare.failures, bare.skipped, bare.passed) == (10, 2, 3, 5)
    nested = parse_junit_file(write(tmp_path, "nested.xml", NESTED))
    assert (nested.tests, nested.failures, nested.skipped, nested.passed) == (3, 1, 1, 1)


def test_several_files_are_summed_and_malformed_ones_reported(tmp_path):
    files = [
        write(tmp_path, "a.xml", PYTEST_STYLE),
        write(tmp_path, "b.xml", BARE_SUITE_ATTRS_ONLY),
        write(tmp_path, "broken.xml", "<testsuite><testcase name='a'>"),
        write(tmp_path, "other.xml", "<project/>"),
        tmp_path / "missing.xml",
    ]
    totals = parse_junit(files)
    assert (totals.tests, totals.failures, totals.errors, totals.skipped) == (15, 3, 1, 4)
    assert len(totals.files) == 2
    assert len(totals.problems) == 3
    assert any("broken.xml" in p and "not well-formed" in p for p in totals.problems)
    assert any("other.xml" in p and "<project>" in p for p in totals.problems)
    assert any("missing.xml" in p for p in totals.problems)


def test_junit_in_walks_artifacts_and_ignores_unrelated_xml(tmp_path):
    write(tmp_path, "suite/junit.xml", PYTEST_STYLE)
    write(tmp_path, "model/config.xml", "<configuration/>")
    write(tmp_path, "suite/partial.xml", "<testsuite>")
    totals = junit_in(tmp_path)
    assert totals.tests == 5 and len(totals.files) == 1
    assert len(totals.problems) == 1 and "partial.xml" in totals.problems[0]
    assert not junit_in(tmp_path / "absent").found


def report():
    t0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    return compute_cost(
        run_id="r-42", job="qwen3-4b", tier="smoke", model="Qwen/Qwen3-4B", provider="aws",
        instance_type="g6.xlarge", region="us-east-1", spot=True, price_per_hour=0.8048,
        price_source="live", launched_at=t0, terminated_at=t0 + timedelta(seconds=900),
        phases=[PhaseTiming("server_start", t0, t0 + timedelta(seconds=300)),
                PhaseTiming("suite", t0 + timedelta(seconds=300), t0 + timedelta(seconds=900))],
        estimated_cost_usd=0.2, ci=CIContext())


GITHUB_ENV = {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "acme/llm",
              "GITHUB_RUN_ID": "123"}


def test_markdown_has_result_tests_cost_phases_and_link(tmp_path):
    junit = parse_junit([write(tmp_path, "j.xml", PYTEST_STYLE)])
    md = step_summary_markdown(run_id="r-42", job="qwen3-4b", tier="smoke", status="failed",
                               exit_code=1, report=report(), junit=junit, environ=GITHUB_ENV)
    assert "qwen3-4b" in md and "(smoke): failed" in md and "exit code 1" in md
    assert "2 passed, 1 failed, 1 errors, 1 skipped (5 total)" in md
    assert "$0.2012" in md and "estimate $0.2000" in md and "spot" in md and "live" in md
    assert "| server_start |" in md and "| suite |" in md
    assert "https://github.com/acme/llm/actions/runs/123" in md
    assert run_url({}) is None


def test_markdown_without_junit_or_github(tmp_path):
    md = step_summary_markdown(run_id="r-1", job="j", status="error", exit_code=3,
                               junit=parse_junit([]), artifacts_dir=tmp_path, message="no capacity",
                               environ={})
    assert "no JUnit XML report found" in md and str(tmp_path) in md and "no capacity" in md


def test_append_only_when_variable_is_set(tmp_path):
    assert append_step_summary("x", environ={}) is None
    target = tmp_path / "summary.md"
    target.write_text("# earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(target)}
    assert append_step_summary("first\n", environ=env) == target
    assert append_step_summary("second\n", environ=env) == target
    assert target.read_text() == "# earlier step\nfirst\nsecond\n"


def test_unwritable_summary_warns_and_does_not_raise(tmp_path, capsys):
    env = {"GITHUB_STEP_SUMMARY": str(tmp_path / "no" / "such" / "dir" / "s.md")}
    assert append_step_summary("x", environ=env) is None
    assert "cannot write the step summary" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_summary_through_the_real_environment_in_a_child_process(tmp_path):
    """The default environ is the process's own: a child with GITHUB_STEP_SUMMARY set
    (as the runner sets it) writes there."""
    target = tmp_path / "step-summary.md"
    code = ("from ephemera.results.summary import append_step_summary, step_summary_markdown;"
            "append_step_summary(step_summary_markdown(run_id='r', job='j', status='passed', exit_code=0))")
    env = {"GITHUB_STEP_SUMMARY": str(target), "PATH": "/usr/bin:/bin", **GITHUB_ENV}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=50)
    text = target.read_text()
    assert "`j`: passed" in text and "actions/runs/123" in text



def test_cost_files_history_row_and_summary_agree(tmp_path):
    """What the run's report stage writes, from one report: the three must agree."""
    from ephemera.results import history
    from ephemera.results.cost import CostReport, write_cost_files
    from ephemera.results.history import RunRecord, record_run

    final = report().with_outcome("failed", 1)
    artifacts = tmp_path / "runs" / "r-42"
    write(artifacts, "results/junit.xml", PYTEST_STYLE)
    json_path, md_path = write_cost_files(final, artifacts)
    record_run(RunRecord.from_report(final))
    summary_file = tmp_path / "step-summary.md"
    env = {"GITHUB_STEP_SUMMARY": str(summary_file), **GITHUB_ENV}
    append_step_summary(step_summary_markdown(
        run_id=final.run_id, job=final.job, tier=final.tier, status=final.status,
        exit_code=final.exit_code, report=final, junit=junit_in(artifacts),
        artifacts_dir=artifacts, environ=env), environ=env)

    saved = CostReport.from_json(json_path)
    row = history.get_run("r-42")
    assert saved.status == row["status"] == "failed" and row["exit_code"] == saved.exit_code == 1
    assert row["cost_usd"] == pytest.approx(saved.cost_usd)
    assert row["billed_seconds"] == saved.billed_seconds == 900
    assert row["phases"] == {"server_start": 300.0, "suite": 600.0}
    money = f"${saved.cost_usd:.4f}"
    assert money in md_path.read_text() and money in summary_file.read_text()
    assert "2 passed, 1 failed" in summary_file.read_text()
