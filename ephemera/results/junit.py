"""Test results from the JUnit XML files a run brings back: counts, test cases, groups.

The files are written by whatever test runner the job uses (the pull request's code),
so reading them never raises: a file that is not JUnit XML is a *problem* (named, with
the reason) and is skipped. They are read as a stream, keeping only counts and a
bounded record of each test case (its file, class, name, outcome and properties), with
no DTD, entities or external references (defusedxml), and at most ``_MAX_XML_DEPTH``
elements deep, so neither an entity bomb nor a huge or deep file can exhaust memory.

pytest, unittest-xml-reporting, go-junit-report and jest-junit all write the same
shape: ``<testsuites>`` / ``<testsuite>`` holding ``<testcase>`` elements whose child
``<failure>``, ``<error>`` or ``<skipped>`` says the outcome, and optionally
``<properties><property name=... value=...>`` (pytest's ``record_property``).

Groups: ``file`` (the case's ``file`` attribute, else its class name's module part),
``class`` (``classname``), ``marker`` (properties named ``marker`` or ``markers``, comma
separated: a test with two markers counts in both) and ``property:NAME``.
"""

from __future__ import annotations

import fnmatch
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keep the walk for XML files bounded: artifacts may hold whole model caches.
_MAX_XML_FILES = 200
_MAX_XML_BYTES = 50 * 1024 * 1024
_MAX_XML_DEPTH = 256
_MAX_COUNT = 10**9          # a count attribute above this is not a real test count
_MAX_CASES = 100_000        # test cases kept for grouping (all are counted)
_MAX_PROPS = 32             # properties kept per test case
_MAX_TEXT = 200             # characters kept of a name, class, file or property value
_CHUNK = 4 << 20             # expat rescans a token cut by a chunk border: keep borders few
_SUITES = ("testsuite", "testsuites")
_CASE_ATTRS = ("classname", "name", "file")
NO_GROUP = "(none)"
OUTCOMES = ("passed", "failed", "errors", "skipped")


# ---- counts ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One test case as the report states it (texts clipped to ``_MAX_TEXT``)."""

    file: str
    classname: str
    name: str
    outcome: str                        # passed | failed | errors | skipped
    properties: tuple[tuple[str, str], ...] = ()


@dataclass
class JUnitTotals:
    """Counts over one or more JUnit XML files. ``passed`` excludes skipped tests."""

    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # files that could not be read
    cases: list[Case] = field(default_factory=list)
    cases_dropped: int = 0                               # beyond _MAX_CASES, counted only

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
        room = max(0, _MAX_CASES - len(self.cases))
        self.cases += other.cases[:room]
        self.cases_dropped += other.cases_dropped + max(0, len(other.cases) - room)


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


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NotJUnit(Exception):
    """A file that parses but is not a JUnit report (or not one we will read)."""


class _Open:
    """An element being read: a suite collects counts, a test case its children's kinds
    and properties."""

    __slots__ = ("tag", "attrib", "cases", "nested", "has_cases", "has_nested", "kinds", "props")

    def __init__(self, tag: str, attrib: dict[str, str]) -> None:
        self.tag = tag
        self.attrib = attrib
        self.cases = [0, 0, 0, 0]
        self.nested = [0, 0, 0, 0]
        self.has_cases = self.has_nested = False
        self.kinds: set[str] = set()
        self.props: list[tuple[str, str]] = []

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


def _kept_attrib(name: str, attrib: dict[str, str]) -> dict[str, str]:
    if name in _SUITES:
        return dict(attrib) if len(attrib) < 64 else {}
    if name == "testcase":
        return {k: _clip(attrib[k], _MAX_TEXT) for k in _CASE_ATTRS if k in attrib}
    if name == "property":
        return {k: _clip(attrib.get(k, ""), _MAX_TEXT) for k in ("name", "value")}
    return {}


class _Counter:
    """Parser target that keeps only the open elements, the counts and the cases."""

    def __init__(self, keep_cases: int = _MAX_CASES) -> None:
        self.stack: list[_Open] = []
        self.result: list[int] | None = None
        self.cases: list[Case] = []
        self.keep_cases = keep_cases
        self.dropped = 0

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        name = _local(tag)
        if not self.stack and name not in _SUITES:
            raise _NotJUnit(f"root element <{_clip(name)}> is not <testsuites> or <testsuite>")
        if len(self.stack) >= _MAX_XML_DEPTH:
            raise _NotJUnit(f"elements nested deeper than {_MAX_XML_DEPTH}, not read")
        self.stack.append(_Open(name, _kept_attrib(name, attrib)))

    def end(self, tag: str) -> None:
        done = self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        if parent is None:
            self.result = done.counts()
        elif done.tag == "property" and parent.tag == "properties":
            owner = self.stack[-2] if len(self.stack) >= 2 else None
            if owner is not None and owner.tag == "testcase" and len(owner.props) < _MAX_PROPS:
                owner.props.append((done.attrib.get("name", ""), done.attrib.get("value", "")))
        elif parent.tag == "testcase":
            parent.kinds.add(done.tag)
        elif parent.tag in _SUITES and done.tag == "testcase":
            parent.has_cases = True
            kinds = done.kinds
            index = 2 if "error" in kinds else 1 if "failure" in kinds else 3 if "skipped" in kinds else None
            parent.cases[0] += 1
            if index is not None:
                parent.cases[index] += 1
            self._keep(done, OUTCOMES[index] if index is not None else "passed")
        elif parent.tag in _SUITES and done.tag == "testsuite":
            parent.has_nested = True
            parent.nested = [x + y for x, y in zip(parent.nested, done.counts(), strict=True)]

    def _keep(self, case: _Open, outcome: str) -> None:
        if len(self.cases) >= self.keep_cases:
            self.dropped += 1
            return
        a = case.attrib
        self.cases.append(Case(file=a.get("file", ""), classname=a.get("classname", ""),
                               name=a.get("name", ""), outcome=outcome,
                               properties=tuple(case.props)))

    def data(self, text: str) -> None:
        pass  # captured output is not needed, and can be large

    def close(self) -> list[int] | None:
        return self.result


def _count_file(path: Path) -> _Counter:
    """Counts and cases of one file, read as a stream."""
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
    return counter


def parse_junit_file(path: str | os.PathLike[str]) -> JUnitTotals:
    """Counts and cases in one JUnit XML file; a problem (not a raise) when it is not one."""
    from defusedxml import DefusedXmlException

    path = Path(path)
    totals = JUnitTotals()
    try:
        if path.stat().st_size > _MAX_XML_BYTES:
            totals.problems.append(f"{path}: larger than {_MAX_XML_BYTES // 2**20} MiB, not read")
            return totals
        counter = _count_file(path)
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
    assert counter.result is not None
    totals.tests, totals.failures, totals.errors, totals.skipped = counter.result
    totals.cases, totals.cases_dropped = counter.cases, counter.dropped
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
        if path.is_file() and not path.is_symlink():
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


def junit_matching(directory: str | os.PathLike[str], patterns: Iterable[str]) -> JUnitTotals:
    """Counts from the files under ``directory`` that match the job's ``results.junit``
    globs (relative to the artifacts directory, ``**`` for any depth). A pattern that
    matches no file, and a matched file that is not JUnit XML, are problems."""
    directory = Path(directory)
    totals = JUnitTotals()
    candidates = _walk(directory)
    taken: set[Path] = set()
    for pattern in patterns:
        hits = [p for p in candidates
                if _glob_match(p.relative_to(directory).as_posix(), pattern)]
        if not hits:
            totals.problems.append(f"results.junit: '{pattern}' matched no file in {directory}")
        for path in hits:
            if path not in taken and len(taken) < _MAX_XML_FILES:
                taken.add(path)
                totals.add(parse_junit_file(path))
    return totals


def _walk(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if not path.is_symlink() and path.is_file():
                out.append(path)
                if len(out) >= 10_000:
                    return out
    return out


def _glob_match(relative: str, pattern: str) -> bool:
    """fnmatch (``*`` crosses directories) with ``**/`` also matching no directory."""
    return (fnmatch.fnmatchcase(relative, pattern)
            or ("**/" in pattern and fnmatch.fnmatchcase(relative, pattern.replace("**/", ""))))


# ---- groups ------------------------------------------------------------------------

@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    @property
    def judged(self) -> int:
        """Tests that count for a pass rate: skipped ones do not."""
        return self.passed + self.failed + self.errors

    @property
    def pass_rate(self) -> float | None:
        return self.passed / self.judged if self.judged else None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failed": self.failed, "errors": self.errors,
                "skipped": self.skipped, "pass_rate": self.pass_rate}


def check_grouping(group: str) -> str:
    """``marker``, ``file``, ``class`` or ``property:NAME``; ValueError otherwise."""
    if group in ("marker", "file", "class"):
        return group
    if group.startswith("property:") and group[len("property:"):].strip():
        return group
    raise ValueError(f"'{group}' is not a grouping: use marker, file, class or property:NAME")


def _module_of(classname: str) -> str:
    """pytest's ``tests.test_x.TestY`` -> ``tests/test_x.py``; other runners' class
    names (Go packages, Jest suites) stay as they are."""
    if "/" in classname or " " in classname:
        return classname
    parts = classname.split(".")
    while len(parts) > 1 and parts[-1][:1].isupper():
        parts.pop()
    if len(parts) > 1 or parts[0].startswith("test"):
        return "/".join(parts) + ".py"
    return classname


def keys_of(case: Case, group: str) -> list[str]:
    """The groups a case belongs to under ``group`` (at least one)."""
    if group == "class":
        return [case.classname or NO_GROUP]
    if group == "file":
        return [case.file or (_module_of(case.classname) if case.classname else NO_GROUP)]
    if group == "marker":
        names = [v.strip() for k, value in case.properties if k in ("marker", "markers")
                 for v in value.replace(" ", ",").split(",") if v.strip()]
        return list(dict.fromkeys(names)) or [NO_GROUP]
    wanted = group[len("property:"):]
    values = [v for k, v in case.properties if k == wanted]
    return list(dict.fromkeys(values)) or [NO_GROUP]


def group_counts(cases: Iterable[Case], group: str) -> dict[str, Counts]:
    """Counts per group, groups in name order ("(none)" last)."""
    groups: dict[str, Counts] = {}
    for case in cases:
        for key in keys_of(case, group):
            groups.setdefault(key, Counts()).add(case.outcome)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] == NO_GROUP, kv[0])))


def total_counts(totals: JUnitTotals) -> Counts:
    return Counts(passed=totals.passed, failed=totals.failures, errors=totals.errors,
                  skipped=totals.skipped)


@dataclass
class Results:
    """What a run's reports say: totals, groups under one grouping, and problems."""

    totals: JUnitTotals
    group_by: str | None = None

    @property
    def found(self) -> bool:
        return self.totals.found

    @property
    def overall(self) -> Counts:
        return total_counts(self.totals)

    def groups(self, group: str | None = None) -> dict[str, Counts]:
        group = group or self.group_by
        return group_counts(self.totals.cases, group) if group else {}

    def to_dict(self, extra_groupings: Iterable[str] = ()) -> dict[str, Any]:
        groupings = list(dict.fromkeys([g for g in (self.group_by, *extra_groupings) if g]))
        return {
            "found": self.found,
            "files": list(self.totals.files),
            "problems": list(self.totals.problems),
            "total": self.overall.to_dict(),
            "groups": {g: {k: c.to_dict() for k, c in self.groups(g).items()} for g in groupings},
            "cases_not_grouped": self.totals.cases_dropped,
        }


def read_results(artifacts_dir: str | os.PathLike[str], patterns: Iterable[str] | None = None,
                 group_by: str | None = None) -> Results:
    """The run's results: the files matching ``patterns`` (the job's ``results.junit``),
    or every JUnit file in the artifacts when there are none."""
    patterns = list(patterns or [])
    totals = junit_matching(artifacts_dir, patterns) if patterns else junit_in(artifacts_dir)
    return Results(totals=totals, group_by=group_by)


# ---- tables ------------------------------------------------------------------------

def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def table_rows(results: Results, group: str | None = None) -> list[list[str]]:
    """[group, passed, failed, errors, skipped, pass rate] rows, the total last."""
    rows = [[key, str(c.passed), str(c.failed), str(c.errors), str(c.skipped), _rate(c.pass_rate)]
            for key, c in results.groups(group).items()]
    total = results.overall
    rows.append(["total", str(total.passed), str(total.failed), str(total.errors),
                 str(total.skipped), _rate(total.pass_rate)])
    return rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = []
    for row in [headers, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def results_headers(group: str | None) -> list[str]:
    return [group or "results", "passed", "failed", "errors", "skipped", "pass rate"]
