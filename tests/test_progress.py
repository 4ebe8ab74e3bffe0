"""What a run prints: on GitHub Actions, text that others wrote (the suite's output,
a server log tail inside an error) can never become a workflow command."""

from __future__ import annotations

import io

from ephemera.progress import Reporter

HOSTILE = ["::error::pwned", "  ::add-mask::hide-everything", "::stop-commands::tok",
           "::set-output name=x::y", "::warning file=a::b"]


def _lines(monkeypatch, github: bool, act) -> list[str]:
    if github:
        monkeypatch.setenv("GITHUB_ACTIONS", "true")
    else:
        monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    out = io.StringIO()
    act(Reporter(out, live=False))
    return out.getvalue().splitlines()


def test_suite_output_cannot_issue_workflow_commands(monkeypatch):
    def act(reporter: Reporter) -> None:
        with reporter.group("suite output"):
            for line in HOSTILE:
                reporter.line(line, "suite")
            reporter.line("plain output", "suite")
        reporter.error("vLLM exited while starting:\n::error::from the log\nlast line")
        reporter.warn("teardown slow\n::add-mask::x")

    lines = _lines(monkeypatch, True, act)
    commands = [ln for ln in lines if ln.lstrip().startswith("::")]
    # Only ephemera's own: the group, its end, one error annotation and one warning.
    assert commands == ["::group::suite output", "::endgroup::", "::error::vLLM exited while starting:",
                        "::warning::teardown slow"]
    for hostile in HOSTILE:   # still shown, behind a marker
        assert f"| {hostile}" in lines
    assert "plain output" in lines and "| ::error::from the log" in lines


def test_outside_github_lines_keep_their_source_prefix(monkeypatch):
    lines = _lines(monkeypatch, False, lambda r: r.line("::error::x", "suite"))
    assert lines == ["suite| ::error::x"]
