"""The run's summary for GitHub Actions: result, test counts, cost, phases, links.

Test counts come from the JUnit XML files the suite left in the artifacts. Those
files are written by whatever test runner the job uses, so reading them never fails
the run: a file that is not JUnit XML is named in the summary and skipped.
The summary is appended to ``$GITHUB_STEP_SUMMARY`` only when that variable is set.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ephemera.cost import CostReport, phases_table, seconds_text, usd

# Keep the walk for XML files bounded: artifacts may hold whole model caches.
_MAX_XML_FILES = 200
_MAX_XML_BYTES = 50 * 1024 * 1024


@dataclass
class JUnitTotals:
    """Counts over one or more JUnit XML files. ``passed`` excludes skipped tests."""

    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # files that could not be read

    @property
    def passed(self) -> int:
        return max(0, self.tests - self.failures - self.errors - self.skipped)

    @property
    def found(self) -> bool:
        return bool(self.files)

    def add(self, other: JUnitTotals) -> None:
        self.tests += other.tests
        self.failures += other.failures
        self.errors += other.errors
        self.skipped += other.skipped
        self.files += other.files
        self.problems += other.problems


def _int_attr(element: ET.Element, name: str) -> int:
    try:
        return max(0, int(float(element.get(name, "0") or 0)))
    except ValueError:
        return 0


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _count_suite(suite: ET.Element) -> tuple[int, int, int, int]:
    """Counts of one <testsuite>: from its <testcase> children when it has any (the
    truth), else from its attributes (some tools write only the totals)."""
    cases = [c for c in suite if _local(c.tag) == "testcase"]
    nested = [s for s in suite if _local(s.tag) == "testsuite"]
    tests = failures = errors = skipped = 0
    if cases:
        for case in cases:
            kinds = {_local(child.tag) for child in case}
            tests += 1
            if "error" in kinds:
                errors += 1
            elif "failure" in kinds:
                failures += 1
            elif "skipped" in kinds:
                skipped += 1
    elif not nested:
        tests = _int_attr(suite, "tests")
        failures = _int_attr(suite, "failures")
        errors = _int_attr(suite, "errors")
        skipped = _int_attr(suite, "skipped") or _int_attr(suite, "skip")
    for child in nested:
        t, f, e, s = _count_suite(child)
        tests, failures, errors, skipped = tests + t, failures + f, errors + e, skipped + s
    return tests, failures, errors, skipped


def parse_junit_file(path: str | os.PathLike[str]) -> JUnitTotals:
    """Counts in one JUnit XML file; a problem (not a raise) when it is not one."""
    path = Path(path)
    totals = JUnitTotals()
    try:
        if path.stat().st_size > _MAX_XML_BYTES:
            totals.problems.append(f"{path}: larger than {_MAX_XML_BYTES // 2**20} MiB, not read")
            return totals
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        totals.problems.append(f"{path}: not well-formed XML ({exc})")
        return totals
    except OSError as exc:
        totals.problems.append(f"{path}: cannot read ({exc.strerror or exc})")
        return totals
    tag = _local(root.tag)
    if tag == "testsuites":
        suites = [s for s in root if _local(s.tag) == "testsuite"]
        if suites:
            for suite in suites:
                t, f, e, s = _count_suite(suite)
                totals.tests += t
                totals.failures += f
                totals.errors += e
                totals.skipped += s
        else:
            t, f, e, s = _count_suite(root)
            totals.tests, totals.failures, totals.errors, totals.skipped = t, f, e, s
    elif tag == "testsuite":
        totals.tests, totals.failures, totals.errors, totals.skipped = _count_suite(root)
    else:
        totals.problems.append(f"{path}: root element <{tag}> is not <testsuites> or <testsuite>")
        return totals
    totals.files.append(str(path))
    return totals


def parse_junit(paths: Iterable[str | os.PathLike[str]]) -> JUnitTotals:
    """Counts summed over several files."""
    totals = JUnitTotals()
    for path in paths:
        totals.add(parse_junit_file(path))
    return totals


def find_junit_files(directory: str | os.PathLike[str]) -> list[Path]:
    """XML files under the artifacts directory that look like JUnit reports (the root
    element is checked when parsing; here only the name and a bounded walk)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found: list[Path] = []
    for path in sorted(directory.rglob("*.xml")):
        if path.is_file():
            found.append(path)
            if len(found) >= _MAX_XML_FILES:
                break
    return found


def junit_in(directory: str | os.PathLike[str]) -> JUnitTotals:
    """Counts from every JUnit file under ``directory``; other XML files are ignored
    quietly (only files that look like JUnit but do not parse are problems)."""
    totals = JUnitTotals()
    for path in find_junit_files(directory):
        one = parse_junit_file(path)
        if one.found or any("not well-formed" in p for p in one.problems):
            totals.add(one)
    return totals


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
    if report is not None and report.rows():
        lines += ["", "<details><summary>Time and cost by phase</summary>", "",
                  phases_table(report), "", "</details>"]
    return "\n".join(lines) + "\n\n"


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
        import sys

        print(f"ephemera: warning: cannot write the step summary to {path}: {exc}", file=sys.stderr)
        return None
    return path
