"""Where a run's time went: each phase's start (seconds from the run's start) and length,
as ``--json`` rows and as the short table printed at the end of a run. Phases may
overlap (``prepare`` runs during ``health``): the table's bars show it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

BAR_WIDTH = 40


class Timed(Protocol):
    name: str
    started_at: datetime
    ended_at: datetime | None
    ok: bool


def _seconds(start: datetime, end: datetime | None) -> float:
    return max(0.0, ((end or datetime.now(UTC)) - start).total_seconds())


def phase_rows(phases: Sequence[Timed], started_at: datetime | None) -> list[dict[str, Any]]:
    """One row per phase: name, start (offset from ``started_at``; the first phase's start
    when it is None), seconds and ok."""
    origin = started_at or (min(p.started_at for p in phases) if phases else None)
    return [{"name": p.name,
             "start": round((p.started_at - origin).total_seconds(), 3) if origin else 0.0,
             "seconds": round(_seconds(p.started_at, p.ended_at), 3), "ok": p.ok}
            for p in phases]


def time_table(phases: Sequence[Timed], started_at: datetime | None) -> str:
    """The phases as a short text table with a bar each on the run's time line."""
    rows = phase_rows(phases, started_at)
    if not rows:
        return ""
    total = max(r["start"] + r["seconds"] for r in rows) or 1.0
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'phase':<{width}}  {'start':>7}  {'took':>7}  time line (0 to {total:.1f}s)"]
    for row in rows:
        first = min(BAR_WIDTH - 1, int(row["start"] / total * BAR_WIDTH))
        length = max(1, round(row["seconds"] / total * BAR_WIDTH))
        bar = " " * first + "#" * min(length, BAR_WIDTH - first)
        mark = "" if row["ok"] else "  (stopped)"
        lines.append(f"{row['name']:<{width}}  {row['start']:>6.1f}s  {row['seconds']:>6.1f}s  "
                     f"|{bar:<{BAR_WIDTH}}|{mark}")
    return "\n".join(lines)
