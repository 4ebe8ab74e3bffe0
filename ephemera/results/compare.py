"""A/B comparison: two or more runs of one suite and one benchmark, side by side.

Each side is what one run brought back (its JUnit cases, its benchmark figures and
per-request latencies, its cost). Every other variant is compared with the baseline
(variant A): pass rates overall and per group with the difference, benchmark figures
with the ratio, the tests that flipped, and two figures that keep a small suite from
declaring a winner by noise:

- McNemar's exact test on the paired pass/fail results: only the discordant pairs
  count (b = passed in A and failed in B, c = the reverse); under "no difference" each
  is a fair coin, so the two-sided p-value is twice the binomial tail of min(b, c)
  among b + c, at most 1.
- A bootstrap confidence interval of the ratio of P90 end-to-end latencies (B / A):
  both sides' requests resampled with replacement, with a fixed seed, the 2.5th and
  97.5th percentiles of the resampled ratios.

``compare.gates`` bound B against A; each failed bound is one line naming the gate and
the variant.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.results.benchmark import (
    HIGHER_IS_BETTER,
    LATENCY_METRICS,
    RATE_METRICS,
    RESULT_NAME,
    BenchmarkError,
    figure_text,
    read_result,
)
from ephemera.results.gates import GateOutcome
from ephemera.results.junit import Case, Counts, markdown_table, read_results, text_table

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.spec.job import CompareSpec

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
_MAX_RESULT_BYTES = 64 * 1024 * 1024
_MAX_SAMPLES = 100_000
SHOWN_FIGURES = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p90_ms", "e2e_p50_ms", "e2e_p90_ms",
                 "e2e_p99_ms", "requests_per_s", "output_tokens_per_s")
SHOWN_FLIPS = 20


# ---- statistics ----------------------------------------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # log of C(n, i) / 2^n, summed in log space so large suites do not overflow.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2.0 * tail)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def bootstrap_ratio_ci(a: list[float], b: list[float], *, q: float = 90.0, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of percentile_q(b) / percentile_q(a); None when a
    side has fewer than two samples or A's percentile is zero."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        pa = percentile(rng.choices(a, k=len(a)), q)
        pb = percentile(rng.choices(b, k=len(b)), q)
        if pa > 0:
            ratios.append(pb / pa)
    if not ratios:
        return None
    tail = (1.0 - level) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)


# ---- one side ------------------------------------------------------------------------

@dataclass
class Side:
    """What one variant's run brought back."""

    name: str
    run_id: str | None = None
    status: str | None = None
    cost_usd: float | None = None
    instance: str | None = None
    overall: Counts | None = None
    groups: dict[str, Counts] = field(default_factory=dict)
    cases: list[Case] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    e2e_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run_id": self.run_id, "status": self.status,
                "cost_usd": self.cost_usd, "instance": self.instance,
                "total": self.overall.to_dict() if self.overall else None,
                "groups": {k: c.to_dict() for k, c in self.groups.items()},
                "metrics": dict(self.metrics), "latency_samples": len(self.e2e_ms),
                "problems": list(self.problems)}


def request_latencies(path: Path) -> list[float]:
    """Per-request end-to-end latencies (ms) of the successful requests in vLLM's
    benchmark JSON: ``latencies`` (seconds), else ``ttfts`` plus the sum of ``itls``
    (older vLLM with --save-detailed). Raises BenchmarkError when there are none."""
    try:
        if path.is_symlink() or not path.is_file():
            raise BenchmarkError(f"{path}: no result file")
        if path.stat().st_size > _MAX_RESULT_BYTES:
            raise BenchmarkError(f"{path}: larger than {_MAX_RESULT_BYTES // 2**20} MiB, not read")
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse)
    except BenchmarkError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BenchmarkError(f"{path}: not a readable JSON result ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: not a JSON object")
    errors = data.get("errors") if isinstance(data.get("errors"), list) else []
    values: list[Any] = []
    if isinstance(data.get("latencies"), list):
        values = data["latencies"]
    elif isinstance(data.get("ttfts"), list) and isinstance(data.get("itls"), list):
        values = [t + sum(i) if _num(t) and isinstance(i, list) and all(_num(x) for x in i) else None
                  for t, i in zip(data["ttfts"], data["itls"], strict=False)]
    out = []
    for index, value in enumerate(values[:_MAX_SAMPLES]):
        failed = index < len(errors) and bool(errors[index])
        if _num(value) and value > 0 and not failed:
            out.append(float(value) * 1000.0)
    if not out:
        raise BenchmarkError(f"{path}: no per-request latencies (vLLM writes them with "
                             "--save-detailed; add it to benchmark.args)")
    return out


def _num(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value) and value >= 0)


def _refuse(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def side_from_artifacts(name: str, artifacts_dir: Path, *, junit: list[str] | None = None,
                        group_by: str | None = None) -> Side:
    """A side read from a run's artifacts directory (JUnit cases, benchmark.json)."""
    side = Side(name=name)
    results = read_results(artifacts_dir, junit or [], group_by)
    side.problems += results.totals.problems
    if results.found:
        side.overall = results.overall
        side.cases = list(results.totals.cases)
        if group_by:
            side.groups = results.groups(group_by)
    bench = artifacts_dir / RESULT_NAME
    if bench.exists():
        try:
            side.metrics = read_result(bench)
            side.e2e_ms = request_latencies(bench)
        except BenchmarkError as exc:
            side.problems.append(str(exc))
    return side


def counts_from_history(stored: dict[str, dict[str, dict[str, int]]],
                        group_by: str | None) -> tuple[Counts | None, dict[str, Counts]]:
    total = stored.get("total", {}).get("all")
    overall = Counts(**total) if total else None
    groups = {k: Counts(**v) for k, v in stored.get(group_by, {}).items()} if group_by else {}
    return overall, groups


# ---- B against A ---------------------------------------------------------------------

def _case_key(case: Case) -> tuple[str, str, str]:
    return (case.file, case.classname, case.name)


def _case_name(key: tuple[str, str, str]) -> str:
    file, classname, name = key
    where = classname or file
    return f"{where}::{name}" if where else name


@dataclass
class Pairing:
    both_passed: int = 0
    both_failed: int = 0
    broke: list[str] = field(default_factory=list)      # passed in A, failed in B
    fixed: list[str] = field(default_factory=list)      # failed in A, passed in B
    only_one: int = 0                                   # run (not skipped) on one side only

    @property
    def p_value(self) -> float:
        return mcnemar_exact(len(self.broke), len(self.fixed))

    def to_dict(self) -> dict[str, Any]:
        return {"paired": self.both_passed + self.both_failed + len(self.broke) + len(self.fixed),
                "both_passed": self.both_passed, "both_failed": self.both_failed,
                "passed_in_a_failed_in_b": self.broke, "failed_in_a_passed_in_b": self.fixed,
                "unpaired": self.only_one, "mcnemar_p": self.p_value}


def pair_cases(a: list[Case], b: list[Case]) -> Pairing:
    """Pair the tests run (not skipped) on both sides by file, class and name."""
    def outcomes(cases: list[Case]) -> dict[tuple[str, str, str], bool]:
        out: dict[tuple[str, str, str], bool] = {}
        for case in cases:
            if case.outcome != "skipped":
                out[_case_key(case)] = case.outcome == "passed"
        return out

    left, right = outcomes(a), outcomes(b)
    pairing = Pairing(only_one=len(left.keys() ^ right.keys()))
    for key in sorted(left.keys() & right.keys()):
        pa, pb = left[key], right[key]
        if pa and pb:
            pairing.both_passed += 1
        elif not pa and not pb:
            pairing.both_failed += 1
        elif pa:
            pairing.broke.append(_case_name(key))
        else:
            pairing.fixed.append(_case_name(key))
    return pairing


@dataclass
class PairComparison:
    a: Side
    b: Side
    pairing: Pairing | None
    ratios: dict[str, float]
    p90_ci: tuple[float, float] | None
    p90_ci_problem: str | None
    gates: list[GateOutcome]

    @property
    def rate_drop(self) -> float | None:
        ra = self.a.overall.pass_rate if self.a.overall else None
        rb = self.b.overall.pass_rate if self.b.overall else None
        return None if ra is None or rb is None else ra - rb

    def to_dict(self) -> dict[str, Any]:
        groups = {}
        for key in dict.fromkeys([*self.a.groups, *self.b.groups]):
            ra, rb = _rate_of(self.a.groups.get(key)), _rate_of(self.b.groups.get(key))
            groups[key] = {"a": ra, "b": rb, "difference": None if ra is None or rb is None else rb - ra}
        return {"a": self.a.name, "b": self.b.name,
                "pass_rate_difference": None if self.rate_drop is None else -self.rate_drop,
                "groups": groups, "ratios": self.ratios,
                "paired": self.pairing.to_dict() if self.pairing else None,
                "e2e_p90_ratio_ci95": list(self.p90_ci) if self.p90_ci else None,
                "e2e_p90_ratio_ci_problem": self.p90_ci_problem,
                "gates": [g.to_dict() for g in self.gates]}


def _rate_of(counts: Counts | None) -> float | None:
    return counts.pass_rate if counts is not None else None


def _ratio_gate(gate: str, metric: str, kind: str, bound: float, pair: PairComparison) -> GateOutcome:
    a, b = pair.a, pair.b
    name = f"compare.{gate}"
    va, vb = a.metrics.get(metric), b.metrics.get(metric)
    if va is None or vb is None or va <= 0:
        missing = a.name if va is None or va <= 0 else b.name
        return GateOutcome(name, False, f"compare gate {gate}: {b.name} vs {a.name}: no usable "
                                        f"{metric} for {missing}", b.name)
    ratio = vb / va
    upper = kind == "max"
    ok = ratio <= bound if upper else ratio >= bound
    text = (f"compare gate {gate}: {b.name}'s {metric} {figure_text(metric, vb)} is {ratio:.3f} x "
            f"{a.name}'s {figure_text(metric, va)}")
    text += (f", within the {'maximum' if upper else 'minimum'} {bound:g}" if ok else
             f", {'above the maximum' if upper else 'below the minimum'} {bound:g}")
    if metric == "e2e_p90_ms" and pair.p90_ci:
        text += f" (95% CI of the ratio {pair.p90_ci[0]:.3f}-{pair.p90_ci[1]:.3f})"
    return GateOutcome(name, ok, text, b.name, ratio, bound)


def _drop_gate(bound: float, pair: PairComparison) -> GateOutcome:
    a, b = pair.a, pair.b
    name = "compare.pass_rate_drop_max"
    drop = pair.rate_drop
    if drop is None:
        missing = a.name if not (a.overall and a.overall.pass_rate is not None) else b.name
        return GateOutcome(name, False, f"compare gate pass_rate_drop_max: {b.name} vs {a.name}: "
                                        f"no test results for {missing}", b.name)
    assert a.overall and b.overall
    ra, rb = a.overall.pass_rate, b.overall.pass_rate
    assert ra is not None and rb is not None
    text = (f"compare gate pass_rate_drop_max: {b.name}'s pass rate {100 * rb:.1f}% "
            f"({b.overall.passed}/{b.overall.judged}) vs {a.name}'s {100 * ra:.1f}% "
            f"({a.overall.passed}/{a.overall.judged}): ")
    ok = drop <= bound + 1e-12
    text += (f"a drop of {100 * drop:.1f} points, " if drop > 0 else "no drop, ")
    text += f"{'within' if ok else 'more than'} the allowed {100 * bound:.1f}"
    if pair.pairing and (pair.pairing.broke or pair.pairing.fixed):
        text += f" (McNemar p = {pair.pairing.p_value:.3g})"
    return GateOutcome(name, ok, text, b.name, drop, bound)


def compare_pair(a: Side, b: Side, spec: CompareSpec | None = None) -> PairComparison:
    ratios = {m: b.metrics[m] / a.metrics[m] for m in LATENCY_METRICS + RATE_METRICS
              if a.metrics.get(m) and m in b.metrics}
    pairing = pair_cases(a.cases, b.cases) if a.cases and b.cases else None
    resamples, seed = (spec.bootstrap, spec.seed) if spec is not None else (2000, 0)
    ci = bootstrap_ratio_ci(a.e2e_ms, b.e2e_ms, resamples=resamples, seed=seed)
    why = None
    if ci is None:
        short = [s.name for s in (a, b) if len(s.e2e_ms) < 2]
        why = (f"fewer than two request latencies for {', '.join(short)}" if short
               else "the baseline's P90 is zero")
    pair = PairComparison(a, b, pairing, ratios, ci, why, [])
    if spec is not None:
        gates = spec.gates
        if gates.pass_rate_drop_max is not None:
            pair.gates.append(_drop_gate(gates.pass_rate_drop_max, pair))
        for metric in LATENCY_METRICS + RATE_METRICS:
            stem = metric.removesuffix("_ms")
            for kind in ("max", "min"):
                bound = getattr(gates, f"{stem}_ratio_{kind}")
                if bound is not None:
                    pair.gates.append(_ratio_gate(f"{stem}_ratio_{kind}", metric, kind, bound, pair))
    return pair


@dataclass
class Comparison:
    sides: list[Side]
    pairs: list[PairComparison]
    placement: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def gates(self) -> list[GateOutcome]:
        return [g for p in self.pairs for g in p.gates]

    @property
    def failed(self) -> list[GateOutcome]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"placement": self.placement, "baseline": self.sides[0].name,
                "variants": [s.to_dict() for s in self.sides],
                "comparisons": [p.to_dict() for p in self.pairs],
                "gates_failed": len(self.failed), "notes": list(self.notes)}


def compare_sides(sides: list[Side], spec: CompareSpec | None = None,
                  placement: str | None = None) -> Comparison:
    """Every side after the first against the first (the baseline)."""
    base = sides[0]
    return Comparison(sides, [compare_pair(base, other, spec) for other in sides[1:]], placement)


# ---- output --------------------------------------------------------------------------

def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _points(diff: float | None) -> str:
    if diff is None:
        return "-"
    return "same" if abs(diff) < 5e-4 else f"{100 * diff:+.1f} pts"


def _ratio_text(metric: str, ratio: float | None) -> str:
    if ratio is None:
        return "-"
    better = (ratio > 1) == (metric in HIGHER_IS_BETTER) if ratio != 1 else None
    return f"{ratio:.3f}x" + ("" if better is None else " (better)" if better else " (worse)")


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one column per variant, then one ratio or difference column
    per compared variant."""
    sides, pairs = comparison.sides, comparison.pairs
    headers = ["", *(s.name for s in sides), *(f"{p.b.name} vs {p.a.name}" for p in pairs)]
    rows = [["status", *(s.status or "-" for s in sides), *("" for _ in pairs)],
            ["cost", *("-" if s.cost_usd is None else f"${s.cost_usd:.4f}" for s in sides),
             *("" for _ in pairs)]]
    rows.append(["pass rate", *(_pct(s.overall.pass_rate if s.overall else None) for s in sides),
                 *(_points(None if p.rate_drop is None else -p.rate_drop) for p in pairs)])
    keys = list(dict.fromkeys(k for s in sides for k in s.groups))
    for key in keys:
        rates = [_rate_of(s.groups.get(key)) for s in sides]
        diffs = []
        for p in pairs:
            ra, rb = _rate_of(p.a.groups.get(key)), _rate_of(p.b.groups.get(key))
            diffs.append(_points(None if ra is None or rb is None else rb - ra))
        rows.append([f"  {key}", *(_pct(r) for r in rates), *diffs])
    for metric in SHOWN_FIGURES:
        if any(metric in s.metrics for s in sides):
            rows.append([metric, *(figure_text(metric, s.metrics.get(metric)) for s in sides),
                         *(_ratio_text(metric, p.ratios.get(metric)) for p in pairs)])
    return headers, rows


def pair_lines(pair: PairComparison) -> list[str]:
    lines = []
    a, b = pair.a.name, pair.b.name
    if pair.pairing is None:
        lines.append(f"{b} vs {a}: no paired test results (JUnit test cases on both sides needed)")
    else:
        pg = pair.pairing
        lines.append(f"{b} vs {a}: {len(pg.broke)} test(s) passed in {a} and failed in {b}, "
                     f"{len(pg.fixed)} the other way; McNemar exact p = {pg.p_value:.3g}"
                     + (" (not significant at 0.05)" if pg.p_value >= 0.05 else " (significant at 0.05)"))
        for label, names in ((f"passed in {a}, failed in {b}", pg.broke),
                             (f"failed in {a}, passed in {b}", pg.fixed)):
            for test in names[:SHOWN_FLIPS]:
                lines.append(f"  {label}: {test}")
            if len(names) > SHOWN_FLIPS:
                lines.append(f"  ... and {len(names) - SHOWN_FLIPS} more")
    if pair.p90_ci:
        lo, hi = pair.p90_ci
        verdict = ("slower" if lo > 1 else "faster" if hi < 1 else "no clear difference")
        lines.append(f"{b} vs {a}: e2e P90 ratio 95% bootstrap CI {lo:.3f}-{hi:.3f} ({verdict}; "
                     f"{len(pair.a.e2e_ms)} and {len(pair.b.e2e_ms)} requests)")
    else:
        lines.append(f"{b} vs {a}: no confidence interval for the e2e P90 ratio ({pair.p90_ci_problem})")
    return lines


def text_lines(comparison: Comparison) -> list[str]:
    headers, rows = table_rows(comparison)
    lines = text_table(headers, rows).splitlines()
    for pair in comparison.pairs:
        lines += pair_lines(pair)
    for side in comparison.sides:
        lines += [f"{side.name}: {problem}" for problem in side.problems]
    lines += comparison.notes
    lines += [("PASS  " if g.passed else "FAIL  ") + g.line for g in comparison.gates]
    return lines


def markdown(comparison: Comparison) -> str:
    headers, rows = table_rows(comparison)
    title = "#### A/B comparison" + (f" ({comparison.placement})" if comparison.placement else "")
    out = [title, "", markdown_table(headers, [[r[0].strip(), *r[1:]] for r in rows]), ""]
    for pair in comparison.pairs:
        out += [f"- {line.strip()}" for line in pair_lines(pair)]
    for side in comparison.sides:
        out += [f"- ⚠️ {side.name}: {problem}" for problem in side.problems]
    out += [f"- {note}" for note in comparison.notes]
    if comparison.gates:
        out += ["", "#### Compare gates", ""]
        out += [f"- {'✅' if g.passed else '❌'} {g.line}" for g in comparison.gates]
    return "\n".join(out) + "\n"
