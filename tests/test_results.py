"""Test results from JUnit XML: cases kept with their properties, grouped by marker, file,
class or property:NAME; the job's globs; malformed and missing files named."""

from __future__ import annotations

from pathlib import Path

from ephemera.results.junit import (
    Case,
    check_grouping,
    group_counts,
    keys_of,
    parse_junit_file,
    read_results,
)

PYTEST_XUNIT1 = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1">
<testcase classname="test_retail" file="test_retail.py" name="test_a[price]">
  <properties><property name="category" value="compliance"/>
  <property name="markers" value="smoke,slow"/></properties></testcase>
<testcase classname="test_retail" file="test_retail.py" name="test_a[eye]">
  <properties><property name="category" value="shelf_layout"/></properties></testcase>
<testcase classname="test_retail" file="test_retail.py" name="test_a[fridge]">
  <properties><property name="category" value="kitchen_safety"/></properties>
  <failure message="no">trace</failure></testcase>
<testcase classname="test_retail" file="test_retail.py" name="test_a[hands]">
  <properties><property name="category" value="kitchen_safety"/></properties>
  <error message="setup">trace</error></testcase>
<testcase classname="tests.test_other.TestThing" name="test_b">
  <skipped message="gpu"/></testcase>
</testsuite></testsuites>
"""

GO_JUNIT = """<testsuites><testsuite name="example.com/pkg" tests="2" failures="1">
<testcase classname="example.com/pkg" name="TestOne" time="0.01"/>
<testcase classname="example.com/pkg" name="TestTwo" time="0.01"><failure message="x"/></testcase>
</testsuite></testsuites>"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cases_keep_outcome_and_properties(tmp_path):
    totals = parse_junit_file(write(tmp_path / "junit.xml", PYTEST_XUNIT1))
    assert (totals.tests, totals.failures, totals.errors, totals.skipped) == (5, 1, 1, 1)
    outcomes = [c.outcome for c in totals.cases]
    assert outcomes == ["passed", "passed", "failed", "errors", "skipped"]
    first = totals.cases[0]
    assert first.file == "test_retail.py" and first.name == "test_a[price]"
    assert ("category", "compliance") in first.properties


def test_group_by_property_marker_file_and_class(tmp_path):
    cases = parse_junit_file(write(tmp_path / "junit.xml", PYTEST_XUNIT1)).cases
    by_category = group_counts(cases, "property:category")
    assert list(by_category) == ["compliance", "kitchen_safety", "shelf_layout", "(none)"]
    kitchen = by_category["kitchen_safety"]
    assert (kitchen.passed, kitchen.failed, kitchen.errors, kitchen.pass_rate) == (0, 1, 1, 0.0)
    assert by_category["(none)"].skipped == 1 and by_category["(none)"].pass_rate is None
    by_marker = group_counts(cases, "marker")
    assert by_marker["smoke"].passed == 1 and by_marker["slow"].passed == 1
    by_file = group_counts(cases, "file")
    assert set(by_file) == {"test_retail.py", "tests/test_other.py"}
    by_class = group_counts(cases, "class")
    assert by_class["test_retail"].judged == 4


def test_go_reporter_groups_by_package(tmp_path):
    cases = parse_junit_file(write(tmp_path / "go.xml", GO_JUNIT)).cases
    groups = group_counts(cases, "class")
    assert groups["example.com/pkg"].pass_rate == 0.5
    assert keys_of(cases[0], "file") == ["example.com/pkg"]


def test_groupings_are_checked():
    assert check_grouping("property:category") == "property:category"
    for bad in ("colour", "property:", "markers"):
        try:
            check_grouping(bad)
        except ValueError as exc:
            assert bad in str(exc)
        else:
            raise AssertionError(bad)
    assert keys_of(Case("", "", "t", "passed"), "marker") == ["(none)"]


def test_default_reads_every_junit_file_and_ignores_other_xml(tmp_path):
    write(tmp_path / "a" / "junit.xml", PYTEST_XUNIT1)
    write(tmp_path / "b" / "go.xml", GO_JUNIT)
    write(tmp_path / "pom.xml", "<project/>")
    results = read_results(tmp_path, None, "property:category")
    assert results.found and len(results.totals.files) == 2 and not results.totals.problems
    assert results.overall.failed == 2 and results.overall.passed == 3


def test_globs_name_missing_and_malformed_files(tmp_path):
    write(tmp_path / "junit.xml", "<testsuite><testcase name='a'>")
    results = read_results(tmp_path, ["junit.xml", "reports/**/*.xml"])
    problems = results.totals.problems
    assert not results.found
    assert any("junit.xml: not well-formed XML" in p for p in problems)
    assert any("'reports/**/*.xml' matched no file" in p for p in problems)


def test_glob_with_double_star_matches_any_depth(tmp_path):
    write(tmp_path / "reports" / "x" / "go.xml", GO_JUNIT)
    write(tmp_path / "reports" / "top.xml", GO_JUNIT)
    results = read_results(tmp_path, ["reports/**/*.xml"])
    assert len(results.totals.files) == 2 and results.overall.passed == 2


def test_results_to_dict_has_groups(tmp_path):
    write(tmp_path / "junit.xml", PYTEST_XUNIT1)
    data = read_results(tmp_path, ["junit.xml"], "property:category").to_dict()
    assert data["total"]["failed"] == 1
    assert data["groups"]["property:category"]["compliance"]["pass_rate"] == 1.0


def test_step_summary_carries_the_runs_results_md(tmp_path):
    from ephemera.results.summary import step_summary_markdown

    write(tmp_path / "results.md", "#### Results\n\n| property:category | passed |\n")
    text = step_summary_markdown(run_id="r", job="j", status="failed", exit_code=1,
                                 artifacts_dir=tmp_path)
    assert "#### Results" in text and "| property:category | passed |" in text
    assert "#### Results" not in step_summary_markdown(run_id="r", job="j", status="passed",
                                                        exit_code=0, artifacts_dir=tmp_path / "x")
