"""Gates: pass rates overall and per group, benchmark bounds (absolute and against the
baseline), the verdict, job-file validation of gates, and where a run came from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ephemera.errors import ConfigError
from ephemera.results.benchmark import BenchmarkResult
from ephemera.results.gates import Baseline, evaluate, run_origin, verdict
from ephemera.results.junit import read_results
from ephemera.spec.job import GatesSpec
from ephemera.spec.jobfile import load_job
from tests.test_results import PYTEST_XUNIT1, write

GATES = {"pass_rate_by": {"group": "property:category",
                          "min": {"default": 0.95, "kitchen_safety": 1.0}}}


def results(tmp_path: Path):
    write(tmp_path / "junit.xml", PYTEST_XUNIT1)
    return read_results(tmp_path, None, "property:category")


def test_a_category_below_its_bound_fails_naming_it_and_both_figures(tmp_path):
    outcomes = evaluate(GatesSpec(**GATES), results(tmp_path), None, None)
    failed = [g for g in outcomes if not g.passed]
    assert [g.group for g in failed] == ["property:category=kitchen_safety"]
    line = failed[0].line
    assert "kitchen_safety" in line and "0.0% (0/2)" in line and "100.0%" in line
    status, code, message = verdict_of(outcomes, "passed")
    assert (status, code) == ("failed", 1) and "kitchen_safety" in message


def verdict_of(outcomes, status, gates=None):
    from ephemera.results.gates import Judgement

    judgement = Judgement(results=gates[1] if gates else None, benchmark=None, gates=outcomes,
                          baseline=None, branch="", commit="", group_by=None)
    spec = gates[0] if gates else GatesSpec()
    return verdict(judgement, spec, status, 0 if status == "passed" else 1, "the suite ...")


def test_lowered_bound_passes_even_when_the_suite_failed(tmp_path):
    spec = GatesSpec(pass_rate_by={"group": "property:category",
                                   "min": {"default": 0.95, "kitchen_safety": 0.0}})
    found = results(tmp_path)
    outcomes = evaluate(spec, found, None, None)
    assert all(g.passed for g in outcomes)
    status, code, message = verdict_of(outcomes, "failed", (spec, found))
    assert (status, code) == ("passed", 0) and "every pass-rate gate held" in message


def test_overall_pass_rate_counts_errors_not_skips(tmp_path):
    outcomes = evaluate(GatesSpec(pass_rate=0.5), results(tmp_path), None, None)
    assert outcomes[0].value == pytest.approx(0.5) and outcomes[0].passed
    outcomes = evaluate(GatesSpec(pass_rate=0.6), results(tmp_path), None, None)
    assert not outcomes[0].passed and "50.0% (2/4)" in outcomes[0].line


def test_result_gates_without_results_fail_with_the_reason(tmp_path):
    empty = read_results(tmp_path, None)
    outcomes = evaluate(GatesSpec(pass_rate=0.9), empty, None, None)
    assert not outcomes[0].passed and "no test results" in outcomes[0].line
    malformed = write(tmp_path / "junit.xml", "<testsuite>")
    found = read_results(tmp_path, ["junit.xml"])
    assert any(str(malformed) in p and "not well-formed" in p for p in found.totals.problems)
    assert not evaluate(GatesSpec(pass_rate=0.9), found, None, None)[0].passed


def test_a_named_group_without_tests_fails(tmp_path):
    spec = GatesSpec(pass_rate_by={"group": "property:category", "min": {"produce": 0.9}})
    outcomes = evaluate(spec, results(tmp_path), None, None)
    assert [g.line for g in outcomes if not g.passed] == [
        "gate pass_rate_by property:category=produce: no test in this group (least 90.0%)"]


BENCH = {"benchmark": {"ttft_p90_ms": {"max": 800}, "e2e_p90_ms": {"max_vs_baseline": 1.3},
                       "output_tokens_per_s": {"min_vs_baseline": 0.8}}}


def baseline(*e2e: float) -> Baseline:
    return Baseline("main", [{"run_id": f"r{i}", "started_at": float(i), "branch": "main",
                              "commit": "", "metrics": {"e2e_p90_ms": v, "output_tokens_per_s": 100.0}}
                             for i, v in enumerate(e2e)])


def test_benchmark_gates_absolute_and_against_the_baseline():
    bench = BenchmarkResult(metrics={"ttft_p90_ms": 900.0, "e2e_p90_ms": 200.0,
                                     "output_tokens_per_s": 90.0})
    outcomes = {g.gate: g for g in evaluate(GatesSpec(**BENCH), None, bench, baseline(100, 120, 140))}
    ttft = outcomes["benchmark.ttft_p90_ms"]
    assert not ttft.passed and "900.0 ms is above the maximum 800.0 ms (by 100.0 ms)" in ttft.line
    e2e = outcomes["benchmark.e2e_p90_ms"]
    assert not e2e.passed and e2e.baseline == 120 and e2e.bound == pytest.approx(156)
    assert "1.3 x baseline 120.0 ms" in e2e.line and "r0, r1, r2" in e2e.line and "'main'" in e2e.line
    assert outcomes["benchmark.output_tokens_per_s"].passed


def test_no_baseline_yet_is_not_compared_and_missing_figures_fail():
    bench = BenchmarkResult(metrics={"ttft_p90_ms": 10.0, "e2e_p90_ms": 20.0})
    outcomes = {g.gate: g for g in evaluate(GatesSpec(**BENCH), None, bench, Baseline("main"))}
    assert outcomes["benchmark.e2e_p90_ms"].passed and outcomes["benchmark.e2e_p90_ms"].skipped
    missing = outcomes["benchmark.output_tokens_per_s"]
    assert not missing.passed and "no figure" in missing.line
    failed_tool = BenchmarkResult(problem="the benchmark exited with status 1: boom")
    outcomes = evaluate(GatesSpec(**BENCH), None, failed_tool, Baseline("main"))
    assert all(not g.passed and "boom" in g.line for g in outcomes)


def job_text(extra: str) -> str:
    return ("name: t\nmodel: {id: ephemera/tiny-llama, max_model_len: 256}\nimage: ephemera/cpu\n"
            "suite: {command: 'true'}\nresources: {provider: local}\n" + extra)


def test_unknown_metric_is_a_line_numbered_error(tmp_path):
    path = write(tmp_path / "job.yaml", job_text(
        "benchmark: {requests: 10}\ngates:\n  benchmark:\n    ttft_p95_ms: {max: 1}\n"))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert "job.yaml:9:5: gates.benchmark.ttft_p95_ms: unknown key 'ttft_p95_ms'" in str(info.value)


def test_benchmark_gates_need_a_benchmark_and_bounds_are_checked(tmp_path):
    path = write(tmp_path / "job.yaml", job_text(
        "gates:\n  pass_rate: 1.5\n  benchmark:\n    ttft_p90_ms: {max: 1}\n"))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    text = str(info.value)
    assert "job.yaml:7:14: gates.pass_rate: Input should be less than or equal to 1" in text
    path.write_text(job_text("gates:\n  benchmark:\n    ttft_p90_ms: {max: 1}\n"))
    with pytest.raises(ConfigError, match="needs a `benchmark:` section"):
        load_job(path)


def test_origin_from_github_variables_and_from_git(tmp_path):
    env = {"GITHUB_REF": "refs/heads/main", "GITHUB_SHA": "abc123"}
    assert run_origin(tmp_path, env) == ("main", "abc123")
    pr = {"GITHUB_REF": "refs/pull/7/merge", "GITHUB_HEAD_REF": "feature/x", "GITHUB_SHA": "def"}
    assert run_origin(tmp_path, pr) == ("feature/x", "def")
    subprocess.run(["git", "init", "-q", "-b", "release-1", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    branch, commit = run_origin(tmp_path, {})
    assert branch == "release-1" and len(commit) == 40


def test_the_example_job_without_results_fails_saying_why(tmp_path):
    from ephemera.results.gates import judge

    loaded = load_job(Path(__file__).resolve().parent.parent / "jobs" / "retail-cpu-gates.yaml")
    artifacts = tmp_path / "run"
    artifacts.mkdir()
    judgement = judge(loaded.job, tier=None, run_id="r", artifacts_dir=artifacts, bench=None,
                      branch="main", commit="", history=tmp_path / "h.sqlite3")
    status, code, message = verdict(judgement, loaded.job.gates, "passed", 0, "the suite passed")
    assert (status, code) == ("failed", 1)
    assert "gate pass_rate: no test results to judge" in message
    assert "results.junit: 'junit.xml' matched no file" in message
    assert "gate benchmark.ttft_p90_ms: no figure to judge (the benchmark did not run)" in message
