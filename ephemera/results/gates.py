"""Gates: the job's bounds on pass rates and benchmark figures, and the run's verdict.

A gate compares one figure with one bound: the overall pass rate, the pass rate of
each group (``pass_rate_by``), or a benchmark figure against an absolute bound or a
multiple of the baseline (the median of the last passing runs of the same job and
tier recorded from one branch). Each failed gate is one line that names the gate,
the group, the figure, the bound and where the baseline came from.

When the job has pass-rate gates, they are the verdict on the tests: a suite that
exited non-zero because some tests failed passes when every gate holds. A run whose
gates need results or figures it does not have fails, saying so.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.masking import mask_data
from ephemera.results.benchmark import (
    METRICS,
    STATS,
    BenchmarkResult,
    benchmark_rows,
    figure_text,
    other_rows,
)
from ephemera.results.judgements import GateRow, baseline_runs, record_judgement
from ephemera.results.junit import (
    Counts,
    Results,
    markdown_table,
    read_results,
    results_headers,
    table_rows,
    text_table,
)

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run
    from ephemera.spec.job import GatesSpec, Job

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# ---- where the run came from ------------------------------------------------------

def _git(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def run_origin(cwd: Path, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(branch, commit) of the run: GitHub's variables (a pull request's head branch,
    else ``GITHUB_REF`` without ``refs/heads/`` or ``refs/tags/``, and ``GITHUB_SHA``),
    else git in the job file's directory; empty when neither knows."""
    env = os.environ if environ is None else environ
    branch = env.get("GITHUB_HEAD_REF", "")
    if not branch:
        ref = env.get("GITHUB_REF", "")
        for prefix in ("refs/heads/", "refs/tags/"):
            if ref.startswith(prefix):
                ref = ref[len(prefix):]
        branch = ref
    commit = env.get("GITHUB_SHA", "")
    if not branch:
        name = _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
        branch = "" if name == "HEAD" else name
    if not commit:
        commit = _git(["rev-parse", "HEAD"], cwd)
    return branch, commit


# ---- baseline ----------------------------------------------------------------------

@dataclass
class Baseline:
    branch: str
    runs: list[dict[str, Any]] = field(default_factory=list)   # newest first

    def median(self, metric: str) -> tuple[float | None, list[str]]:
        """The median of ``metric`` over the runs that have it, and those runs' ids."""
        have = [(r["run_id"], r["metrics"][metric]) for r in self.runs if metric in r["metrics"]]
        if not have:
            return None, []
        return statistics.median(v for _, v in have), [rid for rid, _ in have]

    def to_dict(self) -> dict[str, Any]:
        metrics = sorted({m for r in self.runs for m in r["metrics"]})
        return {"branch": self.branch, "runs": self.runs,
                "median": {m: self.median(m)[0] for m in metrics}}


def load_baseline(job: str, tier: str | None, branch: str, runs: int, *, exclude: str | None,
                  path: Path | None = None) -> Baseline:
    return Baseline(branch=branch, runs=baseline_runs(job, tier, branch, runs, exclude=exclude,
                                                      path=path))


# ---- gates -------------------------------------------------------------------------

@dataclass
class GateOutcome:
    gate: str                     # pass_rate | pass_rate_by | benchmark.METRIC
    passed: bool
    line: str
    group: str | None = None
    value: float | None = None
    bound: float | None = None
    baseline: float | None = None
    baseline_runs: list[str] = field(default_factory=list)
    skipped: bool = False         # nothing to compare with yet (no baseline)

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "group": self.group, "passed": self.passed,
                "skipped": self.skipped, "value": self.value, "bound": self.bound,
                "baseline": self.baseline, "baseline_runs": self.baseline_runs, "line": self.line}


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _rate_gate(gate: str, group: str | None, counts: Counts, least: float) -> GateOutcome:
    rate = counts.pass_rate
    where = f" {group}" if group else ""
    if rate is None:
        return GateOutcome(gate, False, f"gate {gate}{where}: no passed, failed or errored tests "
                                        f"to rate (least {_pct(least)})", group, None, least)
    figures = f"pass rate {_pct(rate)} ({counts.passed}/{counts.judged})"
    if rate + 1e-12 >= least:
        return GateOutcome(gate, True, f"gate {gate}{where}: {figures} >= {_pct(least)}", group, rate, least)
    return GateOutcome(gate, False, f"gate {gate}{where}: {figures} is below the minimum "
                                    f"{_pct(least)} (by {100 * (least - rate):.1f} points)",
                       group, rate, least)


def result_gates(gates: GatesSpec, results: Results | None, why_none: str = "") -> list[GateOutcome]:
    if not gates.on_results:
        return []
    if results is None or not results.found:
        problems = results.totals.problems[:3] if results is not None else []
        reason = why_none or "; ".join(problems) or "no JUnit XML report was found in the artifacts"
        names = [n for n, v in (("pass_rate", gates.pass_rate), ("pass_rate_by", gates.pass_rate_by))
                 if v is not None]
        return [GateOutcome(n, False, f"gate {n}: no test results to judge ({reason})") for n in names]
    out = []
    if gates.pass_rate is not None:
        out.append(_rate_gate("pass_rate", None, results.overall, gates.pass_rate))
    by = gates.pass_rate_by
    if by is not None:
        groups = results.groups(by.group)
        for name in by.min:
            if name != "default" and name not in groups:
                out.append(GateOutcome("pass_rate_by", False,
                                       f"gate pass_rate_by {by.group}={name}: no test in this group "
                                       f"(least {_pct(by.min[name])})", f"{by.group}={name}"))
        for name, counts in groups.items():
            least = by.min.get(name, by.min.get("default"))
            if least is None:
                continue
            group = f"{by.group}={name}"
            if counts.pass_rate is None and name not in by.min:
                # Only skipped tests, under the default bound: nothing to rate.
                out.append(GateOutcome("pass_rate_by", True, f"gate pass_rate_by {group}: only "
                                       "skipped tests, not rated", group, skipped=True))
                continue
            out.append(_rate_gate("pass_rate_by", group, counts, least))
    return out


def _runs_text(baseline: Baseline, used: list[str]) -> str:
    shown = ", ".join(used[:5]) + (", ..." if len(used) > 5 else "")
    return (f"baseline: median of {len(used)} passing run(s) on "
            f"'{baseline.branch or '(no branch)'}' ({shown})")


def _absolute(gate: str, metric: str, value: float, kind: str, bound: float) -> GateOutcome:
    upper = kind == "max"
    ok = value <= bound if upper else value >= bound
    word = "maximum" if upper else "minimum"
    text = f"gate {gate}: {figure_text(metric, value)}"
    if ok:
        return GateOutcome(gate, True, f"{text} within the {word} {figure_text(metric, bound)}",
                           None, value, bound)
    return GateOutcome(gate, False, f"{text} is {'above' if upper else 'below'} the {word} "
                                    f"{figure_text(metric, bound)} (by {figure_text(metric, abs(value - bound))})",
                       None, value, bound)


def _relative(gate: str, metric: str, value: float, kind: str, factor: float,
              baseline: Baseline | None) -> GateOutcome:
    reference, used = baseline.median(metric) if baseline is not None else (None, [])
    if reference is None:
        branch = baseline.branch if baseline is not None else ""
        return GateOutcome(gate, True, f"gate {gate}: no baseline yet (no passing run with this "
                                       f"figure on '{branch or '(no branch)'}'): not compared",
                           None, value, skipped=True)
    bound = factor * reference
    upper = kind == "max_vs_baseline"
    ok = value <= bound if upper else value >= bound
    change = f"{100 * (value / reference - 1):+.0f}%" if reference else "n/a"
    text = (f"gate {gate}: {figure_text(metric, value)} ({change} vs baseline) "
            f"{'is above' if upper and not ok else 'is below' if not ok else 'within'} "
            f"{factor:g} x baseline {figure_text(metric, reference)} = {figure_text(metric, bound)}")
    if not ok:
        text += f" (by {figure_text(metric, abs(value - bound))})"
    return GateOutcome(gate, ok, f"{text}; {_runs_text(baseline, used)}", None, value, bound,
                       reference, used)


def benchmark_gates(gates: GatesSpec, bench: BenchmarkResult | None,
                    baseline: Baseline | None) -> list[GateOutcome]:
    if gates.benchmark is None:
        return []
    out = []
    for metric in METRICS:
        bound = getattr(gates.benchmark, metric)
        if bound is None:
            continue
        gate = f"benchmark.{metric}"
        value = bench.metrics.get(metric) if bench is not None else None
        if value is None:
            why = (bench.problem if bench is not None and bench.problem
                   else "the benchmark did not run" if bench is None
                   else "the benchmark's result has no such figure")
            out.append(GateOutcome(gate, False, f"gate {gate}: no figure to judge ({why})"))
            continue
        for kind in ("max", "min"):
            limit = getattr(bound, kind)
            if limit is not None:
                out.append(_absolute(gate, metric, value, kind, limit))
        for kind in ("max_vs_baseline", "min_vs_baseline"):
            factor = getattr(bound, kind)
            if factor is not None:
                out.append(_relative(gate, metric, value, kind, factor, baseline))
    return out


def needs_baseline(gates: GatesSpec) -> bool:
    bench = gates.benchmark
    if bench is None:
        return False
    return any(b is not None and (b.max_vs_baseline is not None or b.min_vs_baseline is not None)
               for b in (getattr(bench, m) for m in METRICS))


def evaluate(gates: GatesSpec, results: Results | None, bench: BenchmarkResult | None,
             baseline: Baseline | None) -> list[GateOutcome]:
    return result_gates(gates, results) + benchmark_gates(gates, bench, baseline)


# ---- the run's judgement -------------------------------------------------------------

@dataclass
class Judgement:
    results: Results
    benchmark: BenchmarkResult | None
    gates: list[GateOutcome]
    baseline: Baseline | None
    branch: str
    commit: str
    group_by: str | None

    @property
    def failed(self) -> list[GateOutcome]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": self.results.to_dict(),
            "benchmark": self.benchmark.to_dict() if self.benchmark is not None else None,
            "gates": [g.to_dict() for g in self.gates],
            "gates_failed": len(self.failed),
            "baseline": self.baseline.to_dict() if self.baseline is not None else None,
            "branch": self.branch,
            "commit": self.commit,
        }


def _group_for(job: Job) -> str | None:
    if job.results.group_by:
        return job.results.group_by
    return job.gates.pass_rate_by.group if job.gates.pass_rate_by is not None else None


def judge(job: Job, *, tier: str | None, run_id: str, artifacts_dir: Path,
          bench: BenchmarkResult | None, branch: str, commit: str,
          history: Path | None = None) -> Judgement:
    """Read the results, load the baseline when a gate needs one, evaluate the gates."""
    group = _group_for(job)
    results = read_results(artifacts_dir, job.results.junit, group)
    baseline = None
    if needs_baseline(job.gates):
        ref = job.gates.baseline.ref if job.gates.baseline.ref is not None else branch
        baseline = load_baseline(job.name, tier, ref, job.gates.baseline.runs, exclude=run_id,
                                 path=history)
    outcomes = evaluate(job.gates, results, bench, baseline)
    return Judgement(results, bench, outcomes, baseline, branch, commit, group)


def verdict(judgement: Judgement, gates: GatesSpec, status: str, code: int,
            message: str) -> tuple[str, int, str]:
    """The run's (status, exit code, message) once the gates are known. Only a run whose
    suite ran to its end (passed or failed) is judged."""
    if status not in ("passed", "failed"):
        return status, code, message
    failed = judgement.failed
    if failed:
        lines = "; ".join(g.line for g in failed)
        return "failed", 1, f"{len(failed)} gate(s) failed: {lines}"
    if status == "failed" and gates.on_results and judgement.results.found:
        return "passed", 0, f"{message}; every pass-rate gate held, so the run passes"
    return status, code, message


# ---- output --------------------------------------------------------------------------

def markdown(judgement: Judgement) -> str:
    out = ["#### Results", ""]
    results = judgement.results
    if results.found:
        out.append(markdown_table(results_headers(judgement.group_by),
                                  table_rows(results, judgement.group_by)))
    else:
        out.append("No JUnit XML results.")
    for problem in results.totals.problems:
        out.append(f"- ⚠️ {problem}")
    bench = judgement.benchmark
    if bench is not None:
        out += ["", "#### Benchmark", ""]
        if bench.ok:
            out.append(markdown_table(["figure", *STATS], benchmark_rows(bench.metrics)))
            out.append("")
            out += [f"- {name}: {text}" for name, text in other_rows(bench.metrics)]
        else:
            out.append(f"- ⚠️ no figures: {bench.problem}")
    if judgement.gates:
        out += ["", "#### Gates", ""]
        for gate in judgement.gates:
            icon = "➖" if gate.skipped else "✅" if gate.passed else "❌"
            out.append(f"- {icon} {gate.line}")
    return "\n".join(out) + "\n"


def text_lines(judgement: Judgement) -> list[str]:
    lines: list[str] = []
    if judgement.results.found:
        lines += text_table(results_headers(judgement.group_by),
                            table_rows(judgement.results, judgement.group_by)).splitlines()
    bench = judgement.benchmark
    if bench is not None and bench.ok:
        lines += text_table(["benchmark", *STATS], benchmark_rows(bench.metrics)).splitlines()
        lines += [f"{name}: {text}" for name, text in other_rows(bench.metrics)]
    return lines


def judge_run(run: Run, status: str, code: int, message: str) -> tuple[str, int, str]:
    """The controller's step before the report: judge, print, write ``results.md`` and
    ``results.json`` (masked) next to ``cost.md``, and give the verdict. Never raises:
    a judgement that cannot be made is a warning and leaves the verdict as it was,
    unless the job has gates (then the run fails, saying why)."""
    job = run.job
    if status not in ("passed", "failed") and not run.artifacts_dir.exists():
        return status, code, message     # nothing ran that could be judged
    try:
        branch, commit = run_origin(run.loaded.base_dir)
        judgement = judge(job, tier=run.loaded.tier, run_id=run.run_id,
                          artifacts_dir=run.artifacts_dir, bench=run.benchmark_result,
                          branch=branch, commit=commit, history=run.settings.history_path)
    except Exception as exc:  # noqa: BLE001 - the run already tore down
        run.reporter.warn(f"could not judge the results: {type(exc).__name__}: {exc}")
        if (job.gates.on_results or job.gates.benchmark is not None) and status == "passed":
            return "failed", 1, f"the gates could not be evaluated: {exc}"
        return status, code, message
    run.judgement = judgement
    for line in text_lines(judgement):
        run.reporter.info(run.masker(line))
    for problem in judgement.results.totals.problems:
        run.reporter.warn(run.masker(problem))
    for gate in judgement.gates:
        (run.reporter.error if not gate.passed else run.reporter.info)(run.masker(gate.line))
    write_files(run, judgement)
    return verdict(judgement, job.gates, status, code, message)


def write_files(run: Run, judgement: Judgement) -> None:
    try:
        run.artifacts_dir.mkdir(parents=True, exist_ok=True)
        (run.artifacts_dir / RESULTS_MD).write_text(run.masker(markdown(judgement)), encoding="utf-8")

        data = mask_data(judgement.to_dict(), run.masker)
        (run.artifacts_dir / RESULTS_JSON).write_text(json.dumps(data, indent=2), encoding="utf-8")
    except OSError as exc:
        run.reporter.warn(f"could not write {RESULTS_MD}: {exc}")


def record(run: Run) -> dict[str, Any] | None:
    """Store the judgement in the history (after the report wrote the run's row); return
    it, masked, for ``--json``."""
    judgement: Judgement | None = getattr(run, "judgement", None)
    if judgement is None:
        return None

    results = judgement.results
    stored: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    if results.found:
        total = results.overall
        stored["total"] = {"all": (total.passed, total.failed, total.errors, total.skipped)}
        if judgement.group_by:
            stored[judgement.group_by] = {
                run.masker(k): (c.passed, c.failed, c.errors, c.skipped)
                for k, c in results.groups().items()}
    metrics = judgement.benchmark.metrics if judgement.benchmark is not None else {}
    gates = [GateRow(g.gate, g.group, g.value, g.bound, g.baseline, g.passed, run.masker(g.line))
             for g in judgement.gates]
    try:
        record_judgement(run.run_id, branch=judgement.branch, commit=judgement.commit,
                         results=stored, metrics=metrics, gates=gates,
                         path=run.settings.history_path)
    except Exception as exc:  # noqa: BLE001 - the history is not worth failing a run over
        run.reporter.warn(f"could not record the results in the history: {exc}")
    return mask_data(judgement.to_dict(), run.masker)
