"""JUnit XML (written by the suite, i.e. the pull request's code) on hostile input:
reading never raises; it gives counts that are whole, non-negative and bounded, or
names the file as a problem, within the time and memory bounds of tests/hostile.py.
Entity bombs, external entities, deep nesting, huge files and mangled XML included."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ephemera.results.summary import JUnitTotals, junit_in, parse_junit_file
from tests.hostile import MB, bounded

WORKDIR = Path(tempfile.mkdtemp(prefix="ephemera-hostile-junit-"))
REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="t" name="a" time="0.1"/>
<testcase classname="t" name="b" time="0.1"><failure message="boom">trace</failure></testcase>
<testcase classname="t" name="c" time="0.1"><error message="setup">trace</error></testcase>
<testcase classname="t" name="d" time="0.1"><skipped message="gpu"/></testcase>
<testcase classname="t" name="e" time="0.1"><system-out>hi</system-out></testcase>
</testsuite></testsuites>
"""


def check_report(data: bytes, *, seconds: float = 2.0) -> JUnitTotals:
    """The property: never raises; counts are sane; a file not counted is a problem."""
    path = WORKDIR / "junit.xml"
    path.write_bytes(data)
    totals = bounded(lambda: parse_junit_file(path), (), seconds=seconds).value
    counts = (totals.tests, totals.failures, totals.errors, totals.skipped)
    assert all(isinstance(n, int) and 0 <= n <= 10**12 for n in counts), counts
    assert totals.found != bool(totals.problems)
    assert all(str(path) in p and len(p) < 600 for p in totals.problems)
    if totals.found:
        assert totals.files == [str(path)]
    else:
        assert counts == (0, 0, 0, 0)
    return totals


def laughs(levels: int, width: int, where: str) -> str:
    entities = ['  <!ENTITY e0 "lol">']
    for level in range(1, levels + 1):
        entities.append(f'  <!ENTITY e{level} "' + f"&e{level - 1};" * width + '">')
    body = f"&e{levels};"
    root = (f'<testsuite tests="{body}"/>' if where == "attribute"
            else f"<testsuite><testcase name='a'><system-out>{body}</system-out></testcase></testsuite>")
    return '<?xml version="1.0"?>\n<!DOCTYPE t [\n' + "\n".join(entities) + "\n]>\n" + root


@given(levels=st.integers(1, 12), width=st.integers(1, 12),
       where=st.sampled_from(["attribute", "text"]))
def test_entity_expansion_is_refused(levels, width, where):
    totals = check_report(laughs(levels, width, where).encode())
    assert not totals.found and "refused" in totals.problems[0]


@given(kind=st.sampled_from([
    '<!DOCTYPE t SYSTEM "file:///etc/passwd"><testsuite tests="1"/>',
    '<!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><testsuite>&x;</testsuite>',
    '<!DOCTYPE t [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x">%p;]><testsuite/>',
    '<!DOCTYPE t PUBLIC "-//x//y" "http://127.0.0.1:9/x.dtd"><testsuite/>',
    '<?xml-stylesheet href="http://127.0.0.1:9/x"?><testsuite tests="1"/>',
]))
def test_external_references_are_not_followed(kind):
    check_report(kind.encode())


@given(depth=st.integers(1, 100_000), tag=st.sampled_from(["testsuite", "testcase", "a"]))
def test_deep_nesting(depth, tag):
    data = ("<testsuite>" + f"<{tag}>" * depth + f"</{tag}>" * depth + "</testsuite>").encode()
    totals = check_report(data)
    if depth > 300:
        assert not totals.found and "nested deeper" in totals.problems[0]


@pytest.mark.parametrize("size, place", [
    (49 * MB, "text"), (49 * MB, "attribute"), (10 * MB, "comment"), (10 * MB, "cdata"),
    (51 * MB, "text"),
])
def test_huge_files(size, place):
    filler = {"text": "<system-out>{}</system-out>", "attribute": '<property value="{}"/>',
              "comment": "<!--{}-->", "cdata": "<system-err><![CDATA[{}]]></system-err>"}[place]
    head, tail = filler.split("{}")
    path = WORKDIR / "junit.xml"
    with path.open("wb") as fh:
        fh.write(b"<testsuite><testcase name='a'>" + head.encode())
        for _ in range(size // MB):
            fh.write(b"x" * MB)
        fh.write(b"x" * (size % MB) + tail.encode() + b"</testcase></testsuite>")
    totals = bounded(lambda: parse_junit_file(path), (), seconds=5.0).value
    if size > 50 * MB:
        assert not totals.found and "larger than" in totals.problems[0]
    else:
        assert (totals.tests, totals.found) == (1, True)


COUNTS = st.sampled_from(["1", "-1", "0", "1e400", "-1e400", "nan", "inf", "1e300", "1.5",
                          "", "x", "9" * 5000, "0x10", "  3  "])


@given(tests=COUNTS, failures=COUNTS, errors=COUNTS, skipped=COUNTS)
def test_count_attributes(tests, failures, errors, skipped):
    check_report(f'<testsuite tests="{tests}" failures="{failures}" errors="{errors}" '
                 f'skipped="{skipped}"/>'.encode())


SNIPPETS = ["<", ">", "</", "/>", "<testsuite>", "</testsuite>", "<testcase/>", "<failure/>",
            "<![CDATA[", "]]>", "<!--", "-->", "&", "&amp;", "&#0;", "&#x110000;", "&nope;",
            '"', "'", "=", "\x00", "\ufeff", "\x80", "<?xml version='1.0' encoding='utf-16'?>",
            "<!DOCTYPE x>", "xmlns:a='b'", "<a:testsuite>"]


@st.composite
def mangled(draw) -> bytes:
    text = REPORT
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=5)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
    encoding = draw(st.sampled_from(["utf-8", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


@given(data=mangled())
def test_mangled_reports(data):
    check_report(data)


@given(data=st.binary(max_size=2000))
def test_random_bytes(data):
    check_report(data)


def test_a_bomb_among_the_artifacts_is_shown_and_the_rest_counted(tmp_path: Path):
    (tmp_path / "bomb.xml").write_text(laughs(9, 10, "text"))
    (tmp_path / "junit.xml").write_text(REPORT)
    (tmp_path / "other.xml").write_text("<project/>")
    totals = bounded(lambda: junit_in(tmp_path), ()).value
    assert (totals.tests, totals.failures, totals.errors, totals.skipped) == (5, 1, 1, 1)
    assert len(totals.problems) == 1 and "bomb.xml: refused" in totals.problems[0]
