"""The run's summary for GitHub Actions: result, test counts, cost, phases, links.

Test counts come from the JUnit XML files the suite left in the artifacts. Those
files are written by whatever test runner the job uses (the pull request's code), so
reading them never fails the run: a file that is not JUnit XML is named in the
summary and skipped. They are read as a stream, keeping only counts, with no DTD,
entities or external references (defusedxml), and at most ``_MAX_XML_DEPTH``
elements deep, so neither an entity bomb nor a huge or deep file can exhaust memory.
The summary is appended to ``$GITHUB_STEP_SUMMARY`` only when that variable is set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ephemera.cost import CostReport, phases_table, seconds_text, usd

# Keep the walk for XML files bounded: artifacts may hold whole model caches.
_MAX_XML_FILES = 200
_MAX_XML_BYTES = 50 * 1024 * 1024
_MAX_XML_DEPTH = 256
_MAX_COUNT = 10**9          # a count attribute above this is not a real test count
_CHUNK = 4 << 20             # expat rescans a token cut by a chunk border: keep borders few
_SUITES = ("testsuite", "testsuites")


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


def _int_attr(attrib: Mapping[str, str], name: str) -> int:
    """A count attribute; 0 when it is not a finite, non-negative number."""
    try:
        value = float(attrib.get(name, "0") or 0)
    except ValueError:
        return 0
    if not math.isfinite(value) or value < 0:
        return 0
    return int(min(value, _MAX_COUNT))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _NotJUnit(Exception):
    """A file that parses but is not a JUnit report (or not one we will read)."""


class _Open:
    """An element being read: a suite collects counts, a test case its children's kinds."""

    __slots__ = ("tag", "attrib", "cases", "nested", "has_cases", "has_nested", "kinds")

    def __init__(self, tag: str, attrib: dict[str, str]) -> None:
        self.tag = tag
        self.attrib = attrib
        self.cases = [0, 0, 0, 0]
        self.nested = [0, 0, 0, 0]
        self.has_cases = self.has_nested = False
        self.kinds: set[str] = set()

    def counts(self) -> list[int]:
        """A suite's (tests, failures, errors, skipped): from its <testcase> children when
        it has any (the truth), else from its attributes (some tools write only totals)."""
        if self.has_cases:
            own = self.cases
        elif not self.has_nested:
            a = self.attrib
            own = [_int_attr(a, "tests"), _int_attr(a, "failures"), _int_attr(a, "errors"),
                   _int_attr(a, "skipped") or _int_attr(a, "skip")]
        else:
            own = [0, 0, 0, 0]
        return [x + y for x, y in zip(own, self.nested, strict=True)]


class _Counter:
    """Parser target that keeps only the open elements and the counts."""

    def __init__(self) -> None:
        self.stack: list[_Open] = []
        self.result: list[int] | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        name = _local(tag)
        if not self.stack and name not in _SUITES:
            raise _NotJUnit(f"root element <{_clip(name)}> is not <testsuites> or <testsuite>")
        if len(self.stack) >= _MAX_XML_DEPTH:
            raise _NotJUnit(f"elements nested deeper than {_MAX_XML_DEPTH}, not read")
        keep = dict(attrib) if name in _SUITES and len(attrib) < 64 else {}
        self.stack.append(_Open(name, keep))

    def end(self, tag: str) -> None:
        done = self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        if parent is None:
            self.result = done.counts()
        elif parent.tag == "testcase":
            parent.kinds.add(done.tag)
        elif parent.tag in _SUITES and done.tag == "testcase":
            parent.has_cases = True
            kinds = done.kinds
            index = 2 if "error" in kinds else 1 if "failure" in kinds else 3 if "skipped" in kinds else None
            parent.cases[0] += 1
            if index is not None:
                parent.cases[index] += 1
        elif parent.tag in _SUITES and done.tag == "testsuite":
            parent.has_nested = True
            parent.nested = [x + y for x, y in zip(parent.nested, done.counts(), strict=True)]

    def data(self, text: str) -> None:
        pass  # captured output is not needed, and can be large

    def close(self) -> list[int] | None:
        return self.result


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count_file(path: Path) -> list[int]:
    """(tests, failures, errors, skipped) of one file, read as a stream."""
    from defusedxml.ElementTree import DefusedXMLParser

    counter = _Counter()
    parser = DefusedXMLParser(target=counter, forbid_dtd=True, forbid_entities=True,
                              forbid_external=True)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            parser.feed(chunk)
    parser.close()
    if counter.result is None:
        raise _NotJUnit("no root element")
    return counter.result


def parse_junit_file(path: str | os.PathLike[str]) -> JUnitTotals:
    """Counts in one JUnit XML file; a problem (not a raise) when it is not one."""
    import xml.etree.ElementTree as ET

    from defusedxml import DefusedXmlException

    path = Path(path)
    totals = JUnitTotals()
    try:
        if path.stat().st_size > _MAX_XML_BYTES:
            totals.problems.append(f"{path}: larger than {_MAX_XML_BYTES // 2**20} MiB, not read")
            return totals
        counts = _count_file(path)
    except ET.ParseError as exc:
        totals.problems.append(f"{path}: not well-formed XML ({_clip(str(exc), 200)})")
        return totals
    except DefusedXmlException as exc:
        totals.problems.append(f"{path}: refused: a JUnit report has no DTD, entities or "
                               f"external references ({type(exc).__name__})")
        return totals
    except _NotJUnit as exc:
        totals.problems.append(f"{path}: {exc}")
        return totals
    except OSError as exc:
        totals.problems.append(f"{path}: cannot read ({exc.strerror or exc})")
        return totals
    totals.tests, totals.failures, totals.errors, totals.skipped = counts
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


# Problems worth showing for any XML file in the artifacts: a broken or hostile report.
_SHOWN = ("not well-formed", "refused:", "nested deeper")


def junit_in(directory: str | os.PathLike[str]) -> JUnitTotals:
    """Counts from every JUnit file under ``directory``; other XML files are ignored
    quietly (only files that look like JUnit but do not parse are problems)."""
    totals = JUnitTotals()
    for path in find_junit_files(directory):
        one = parse_junit_file(path)
        if one.found or any(m in p for p in one.problems for m in _SHOWN):
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
