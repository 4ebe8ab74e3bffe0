"""The history's record of each run's judgement: test results per group, serving
benchmark figures and gate outcomes, and the baselines read from them."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ephemera.results.history import Transaction, as_number, history_path, with_retry


@dataclass(frozen=True)
class GateRow:
    gate: str
    group: str | None
    value: float | None
    bound: float | None
    baseline: float | None
    passed: bool
    line: str


def record_judgement(run_id: str, *, branch: str = "", commit: str = "",
                     results: dict[str, dict[str, tuple[int, int, int, int]]] | None = None,
                     metrics: dict[str, float] | None = None, gates: Iterable[GateRow] = (),
                     path: Path | None = None) -> None:
    """Store a run's origin (branch, commit), results per grouping and group
    (passed, failed, errors, skipped), benchmark figures and gates, replacing what was
    stored for it before. The run's row, when there is one, gets the branch and commit."""
    db = path or history_path()
    result_rows = [(run_id, grouping, grp, *counts)
                   for grouping, groups in (results or {}).items() for grp, counts in groups.items()]
    metric_rows = [(run_id, name, float(value)) for name, value in (metrics or {}).items()
                   if math.isfinite(value)]
    gate_rows = [(run_id, seq, g.gate, g.group, g.value, g.bound, g.baseline, int(g.passed), g.line)
                 for seq, g in enumerate(gates)]

    def work(conn: sqlite3.Connection) -> None:
        with Transaction(conn):
            for table in ("run_results", "run_metrics", "run_gates"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            conn.executemany("INSERT INTO run_results VALUES (?, ?, ?, ?, ?, ?, ?)", result_rows)
            conn.executemany("INSERT INTO run_metrics VALUES (?, ?, ?)", metric_rows)
            conn.executemany("INSERT INTO run_gates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", gate_rows)
            conn.execute("UPDATE runs SET branch = ?, commit_sha = CASE WHEN ? = '' THEN commit_sha "
                         "ELSE ? END WHERE run_id = ?", (branch, commit, commit, run_id))

    with_retry(db, work)


def _metrics_of(conn: sqlite3.Connection, run_ids: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {r: {} for r in run_ids}
    for run_id in run_ids:
        for name, value in conn.execute(
                "SELECT metric, value FROM run_metrics WHERE run_id = ? ORDER BY metric", (run_id,)):
            number = as_number(value)
            if isinstance(name, str):
                out[run_id][name] = number
    return out


def baseline_runs(job: str, tier: str | None, branch: str, limit: int, *,
                  exclude: str | None = None, path: Path | None = None) -> list[dict]:
    """The last ``limit`` passing runs of ``job`` and ``tier`` recorded from ``branch``
    that have benchmark figures, newest first: run_id, started_at, branch, commit, metrics."""
    db = path or history_path()
    if not db.exists():
        return []

    def work(conn: sqlite3.Connection) -> list[dict]:
        rows = conn.execute(
            "SELECT run_id, started_at, branch, commit_sha FROM runs WHERE job = ? "
            "AND COALESCE(tier, '') = ? AND branch = ? AND status = 'passed' AND run_id != ? "
            "AND EXISTS (SELECT 1 FROM run_metrics m WHERE m.run_id = runs.run_id) "
            "ORDER BY started_at DESC LIMIT ?",
            (job, tier or "", branch, exclude or "", int(limit))).fetchall()
        ids = [str(r[0]) for r in rows]
        metrics = _metrics_of(conn, ids)
        return [{"run_id": str(r[0]), "started_at": as_number(r[1]), "branch": str(r[2]),
                 "commit": str(r[3]), "metrics": metrics[str(r[0])]} for r in rows]

    return with_retry(db, work)


def get_judgement(run_id: str, *, path: Path | None = None) -> dict | None:
    """A run's stored results, figures and gates (None when the run is unknown)."""
    db = path or history_path()
    if not db.exists():
        return None

    def work(conn: sqlite3.Connection) -> dict | None:
        run = conn.execute("SELECT job, tier, status, exit_code, started_at, branch, commit_sha "
                           "FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        results: dict[str, dict[str, dict[str, int]]] = {}
        for grouping, grp, *counts in conn.execute(
                "SELECT grouping, grp, passed, failed, errors, skipped FROM run_results "
                "WHERE run_id = ? ORDER BY grouping, grp", (run_id,)):
            values = [int(as_number(c)) for c in counts]
            results.setdefault(str(grouping), {})[str(grp)] = dict(
                zip(("passed", "failed", "errors", "skipped"), values, strict=True))
        gates = [{"gate": str(g), "group": grp, "value": v, "bound": b, "baseline": base,
                  "passed": bool(ok), "line": str(line)}
                 for g, grp, v, b, base, ok, line in conn.execute(
                     "SELECT gate, grp, value, bound, baseline, passed, line FROM run_gates "
                     "WHERE run_id = ? ORDER BY seq", (run_id,))]
        metrics = _metrics_of(conn, [run_id])[run_id]
        if run is None and not (results or gates or metrics):
            return None
        job, tier, status, exit_code, started, branch, commit = run if run else (None,) * 7
        return {"run_id": run_id, "job": job, "tier": tier, "status": status,
                "exit_code": exit_code, "started_at": started, "branch": branch or "",
                "commit": commit or "", "results": results, "metrics": metrics, "gates": gates}

    return with_retry(db, work)
