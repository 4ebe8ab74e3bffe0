"""A/B comparison: statistics, paired results, compare gates, `ephemera compare`."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from ephemera.results.compare import (
    Side,
    bootstrap_ratio_ci,
    compare_sides,
    mcnemar_exact,
    pair_cases,
    percentile,
    request_latencies,
    text_lines,
)
from ephemera.results.junit import Case, Counts
from ephemera.spec.job import CompareSpec


def test_mcnemar_exact_matches_the_binomial_tail():
    # b=1, c=9: 2 * P(X <= 1), X ~ Bin(10, 0.5) = 2 * 11/1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0           # capped at 1
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # large suites stay finite and tiny
    assert mcnemar_exact(100, 2000) < 1e-100
    assert math.isfinite(mcnemar_exact(5000, 5000))


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10.0], 90) == 10.0
    assert percentile(list(range(11)), 90) == pytest.approx(9.0)


def test_bootstrap_interval_is_seeded_and_covers_the_ratio():
    a = [10.0 + i % 7 for i in range(60)]
    b = [2 * x for x in a]
    ci = bootstrap_ratio_ci(a, b, resamples=500, seed=3)
    assert ci == bootstrap_ratio_ci(a, b, resamples=500, seed=3)
    lo, hi = ci
    assert lo <= 2.0 <= hi and hi - lo < 0.5
    assert bootstrap_ratio_ci([1.0], b) is None


def case(name: str, outcome: str) -> Case:
    return Case(file="tests/test_x.py", classname="tests.test_x", name=name, outcome=outcome)


def test_pairing_lists_flips_both_ways_and_ignores_skipped():
    a = [case("t1", "passed"), case("t2", "passed"), case("t3", "failed"), case("t4", "skipped"),
         case("t5", "passed")]
    b = [case("t1", "passed"), case("t2", "errors"), case("t3", "passed"), case("t4", "failed"),
         case("t6", "passed")]
    p = pair_cases(a, b)
    assert p.broke == ["tests.test_x::t2"] and p.fixed == ["tests.test_x::t3"]
    assert p.both_passed == 1 and p.only_one == 3   # t4 (skipped in a), t5, t6
    assert p.p_value == 1.0


def side(name: str, passed: int, failed: int, e2e_p90: float, cases=(), latencies=()) -> Side:
    return Side(name=name, status="passed", cost_usd=0.5, overall=Counts(passed=passed, failed=failed),
                groups={"kitchen": Counts(passed=passed, failed=failed)}, cases=list(cases),
                metrics={"e2e_p90_ms": e2e_p90, "output_tokens_per_s": 100.0},
                e2e_ms=list(latencies))


def test_compare_gates_fail_naming_the_gate_and_the_variant():
    spec = CompareSpec(gates={"pass_rate_drop_max": 0.02, "e2e_p90_ratio_max": 1.1,
                              "output_tokens_per_s_ratio_min": 0.9})
    a = side("a", 50, 0, 100.0, latencies=[100.0] * 10)
    b = side("b", 45, 5, 150.0, latencies=[150.0] * 10)
    comparison = compare_sides([a, b], spec, "parallel")
    failed = {g.gate: g for g in comparison.failed}
    assert set(failed) == {"compare.pass_rate_drop_max", "compare.e2e_p90_ratio_max"}
    assert "b's pass rate 90.0% (45/50) vs a's 100.0% (50/50): a drop of 10.0 points, more than " \
           "the allowed 2.0" in failed["compare.pass_rate_drop_max"].line
    line = failed["compare.e2e_p90_ratio_max"].line
    assert "b's e2e_p90_ms 150.0 ms is 1.500 x a's 100.0 ms, above the maximum 1.1" in line
    assert "95% CI of the ratio 1.500-1.500" in line
    assert all(g.group == "b" for g in comparison.gates)
    data = comparison.to_dict()
    assert data["comparisons"][0]["groups"]["kitchen"]["difference"] == pytest.approx(-0.1)
    text = "\n".join(text_lines(comparison))
    assert "pass rate" in text and "-10.0 pts" in text and "1.500x (worse)" in text


def test_a_gate_without_figures_fails_saying_which_side_lacks_them():
    spec = CompareSpec(gates={"e2e_p90_ratio_max": 1.1})
    a = side("a", 1, 0, 100.0)
    b = Side(name="b", overall=Counts(passed=1))
    [gate] = compare_sides([a, b], spec).gates
    assert not gate.passed and "no usable e2e_p90_ms for b" in gate.line


def test_request_latencies_from_vllm_json(tmp_path):
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps({"latencies": [0.1, 0.2, 0.0, 0.3], "errors": ["", "", "", "boom"]}))
    assert request_latencies(path) == pytest.approx([100.0, 200.0])
    path.write_text(json.dumps({"ttfts": [0.1, 0.2], "itls": [[0.01, 0.01], [0.02]]}))
    assert request_latencies(path) == pytest.approx([120.0, 220.0])
    path.write_text('{"latencies": [NaN]}')
    with pytest.raises(Exception, match="not a readable JSON"):
        request_latencies(path)


JUNIT = """<testsuites><testsuite name="s">{cases}</testsuite></testsuites>"""


def write_run(root: Path, run_id: str, outcomes: dict[str, bool], latencies: list[float]) -> Path:
    directory = root / run_id
    directory.mkdir(parents=True)
    cases = "".join(f'<testcase classname="tests.test_x" name="{n}">'
                    f'{"" if ok else "<failure/>"}</testcase>' for n, ok in outcomes.items())
    (directory / "junit.xml").write_text(JUNIT.format(cases=cases))
    p90 = percentile(latencies, 90)
    (directory / "benchmark.json").write_text(json.dumps({
        "latencies": [x / 1000 for x in latencies], "p90_e2el_ms": p90, "completed": len(latencies),
        "output_throughput": 10.0}))
    return directory


def test_compare_command_on_past_runs(tmp_path, monkeypatch):
    from ephemera.cli import cli
    from ephemera.results.history import RunRecord, record_run
    from ephemera.spec.settings import get_settings

    root = get_settings().artifacts_dir
    write_run(root, "job-a-1", {"t1": True, "t2": True, "t3": True}, [10.0, 11.0, 12.0, 13.0])
    # a variant of a same-machine A/B run: ROOT/GROUP/VARIANT, its cost in compare.json
    group = root / "job-20260101-000000-abcd"
    write_run(group, "b", {"t1": True, "t2": False, "t3": True}, [20.0, 22.0, 24.0, 26.0])
    (group / "compare.json").write_text(json.dumps({"variants": [
        {"run_id": "job-20260101-000000-abcd-b", "cost_usd": 0.25}]}))
    record_run(RunRecord(run_id="job-a-1", job="job", tier=None, model="m", provider="docker",
                         instance_type="cpu", region=None, status="passed", exit_code=0,
                         started_at=datetime.now(UTC), duration_seconds=1.0, cost_usd=0.75, phases={}))
    result = CliRunner().invoke(cli, ["compare", "job-a-1", "job-20260101-000000-abcd-b", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    pair = data["comparisons"][0]
    assert pair["paired"]["passed_in_a_failed_in_b"] == ["tests.test_x::t2"]
    assert pair["paired"]["mcnemar_p"] == 1.0
    assert pair["ratios"]["e2e_p90_ms"] == pytest.approx(percentile([20, 22, 24, 26], 90)
                                                         / percentile([10, 11, 12, 13], 90))
    assert pair["e2e_p90_ratio_ci95"] is not None
    costs = {v["name"]: v["cost_usd"] for v in data["variants"]}
    assert costs == {"job-a-1": 0.75, "job-20260101-000000-abcd-b": 0.25}
    text = CliRunner().invoke(cli, ["compare", "job-a-1", "job-20260101-000000-abcd-b"]).output
    assert "passed in job-a-1, failed in job-20260101-000000-abcd-b: tests.test_x::t2" in text


def test_compare_command_names_an_unknown_run():
    from ephemera.cli import cli
    from ephemera.errors import ConfigError

    with pytest.raises(ConfigError, match="run 'nope' is neither in the history"):
        CliRunner().invoke(cli, ["compare", "nope", "other"], catch_exceptions=False,
                           standalone_mode=False)


def test_the_markdown_report_for_a_step_summary():
    from ephemera.results.compare import markdown

    spec = CompareSpec(gates={"e2e_p90_ratio_max": 1.1})
    text = markdown(compare_sides([side("a", 2, 0, 100.0), side("b", 2, 0, 150.0)], spec, "same-machine"))
    assert text.startswith("#### A/B comparison (same-machine)")
    assert "| e2e_p90_ms | 100.0 ms | 150.0 ms | 1.500x (worse) |" in text
    assert "- ❌ compare gate e2e_p90_ratio_max: b's e2e_p90_ms" in text
