"""The run history: one row per run in an embedded SQLite database.

The file lives at ``get_settings().history_path`` (default: the user's data
directory). Several runs on one machine may finish at the same moment, so every
write runs in WAL mode with a busy timeout, inside ``BEGIN IMMEDIATE`` (the write
lock is taken up front, so two writers never deadlock upgrading a read lock), and is
retried with a short backoff if the database is still locked after the timeout.

Rows come from three places: the controller records each run as it ends
(:func:`record_run`), ``ephemera down`` records when it finished the teardown of a
run whose own process could not (:func:`record_teardown`: it completes the run's row,
or adds one), and ``ephemera cost --import`` merges ``cost.json`` files from CI
artifacts (:func:`import_cost_files`), idempotently on the run id, because CI
machines are thrown away together with their history.

Readers never trust the file: a damaged database, or rows with values of the wrong
type, end in :class:`~ephemera.errors.InfraError` naming the file (and the run).
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from ephemera.errors import ConfigError, InfraError
from ephemera.provider import parse_time
from ephemera.results.cost import CostReport
from ephemera.spec.settings import get_settings

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 10_000
WRITE_ATTEMPTS = 8

GROUPINGS = ("job", "tier", "model", "instance", "day", "provider")
# --by name -> SQL expression over the runs table (fixed strings, never user input).
_GROUP_SQL = {
    "job": "job",
    "tier": "COALESCE(NULLIF(tier, ''), '(none)')",
    "model": "model",
    "instance": "instance_type",
    "provider": "provider",
    "day": "strftime('%Y-%m-%d', started_at, 'unixepoch')",
    None: "'all'",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id            TEXT PRIMARY KEY,
    job               TEXT NOT NULL,
    tier              TEXT,
    model             TEXT NOT NULL DEFAULT '',
    provider          TEXT NOT NULL,
    instance_type     TEXT NOT NULL DEFAULT '',
    region            TEXT,
    spot              INTEGER NOT NULL DEFAULT 0,
    status            TEXT NOT NULL,
    exit_code         INTEGER,
    started_at        REAL NOT NULL,
    duration_seconds  REAL NOT NULL DEFAULT 0,
    billed_seconds    REAL NOT NULL DEFAULT 0,
    price_per_hour    REAL NOT NULL DEFAULT 0,
    cost_usd          REAL NOT NULL DEFAULT 0,
    estimated_cost_usd REAL,
    phases            TEXT NOT NULL DEFAULT '[]',
    commit_sha        TEXT NOT NULL DEFAULT '',
    ci_run_id         TEXT NOT NULL DEFAULT '',
    repository        TEXT NOT NULL DEFAULT '',
    source            TEXT NOT NULL DEFAULT 'run',
    recorded_at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_started_at ON runs (started_at);
"""
# Version 2: when the machine was launched and when it was verified gone (NULL while
# that is unknown: a teardown that could not be verified, a run still going).
_MIGRATIONS = {
    2: ("ALTER TABLE runs ADD COLUMN launched_at REAL",
        "ALTER TABLE runs ADD COLUMN ended_at REAL",
        "ALTER TABLE runs ADD COLUMN termination_verified INTEGER NOT NULL DEFAULT 0"),
    # Version 3: where the run came from (branch; commit_sha was there already), its test
    # results per group, its benchmark figures and its gates.
    3: ("ALTER TABLE runs ADD COLUMN branch TEXT NOT NULL DEFAULT ''",
        "CREATE TABLE IF NOT EXISTS run_results (run_id TEXT NOT NULL, grouping TEXT NOT NULL, "
        "grp TEXT NOT NULL, passed INTEGER NOT NULL, failed INTEGER NOT NULL, "
        "errors INTEGER NOT NULL, skipped INTEGER NOT NULL, PRIMARY KEY (run_id, grouping, grp))",
        "CREATE TABLE IF NOT EXISTS run_metrics (run_id TEXT NOT NULL, metric TEXT NOT NULL, "
        "value REAL NOT NULL, PRIMARY KEY (run_id, metric))",
        "CREATE TABLE IF NOT EXISTS run_gates (run_id TEXT NOT NULL, seq INTEGER NOT NULL, "
        "gate TEXT NOT NULL, grp TEXT, value REAL, bound REAL, baseline REAL, "
        "passed INTEGER NOT NULL, line TEXT NOT NULL, PRIMARY KEY (run_id, seq))",
        "CREATE INDEX IF NOT EXISTS runs_job_branch ON runs (job, branch, started_at)"),
    # Version 4: when each phase started (seconds from the run's start), beside `phases`
    # (their lengths), so overlapping phases show; older rows read as {}.
    4: ("ALTER TABLE runs ADD COLUMN phase_starts TEXT NOT NULL DEFAULT '{}'",),
}

T = TypeVar("T")


@dataclass(frozen=True)
class RunRecord:
    """One row of the history."""

    run_id: str
    job: str
    tier: str | None
    model: str
    provider: str
    instance_type: str
    region: str | None
    status: str
    exit_code: int | None
    started_at: datetime
    duration_seconds: float
    cost_usd: float
    phases: dict[str, float]           # phase name -> wall seconds
    billed_seconds: float = 0.0
    price_per_hour: float = 0.0
    estimated_cost_usd: float | None = None
    spot: bool = False
    commit: str = ""
    ci_run_id: str = ""
    repository: str = ""
    launched_at: datetime | None = None
    ended_at: datetime | None = None   # verified termination; None while unknown
    termination_verified: bool = False
    phase_starts: dict[str, float] = field(default_factory=dict)  # phase name -> start offset

    @classmethod
    def from_report(cls, report: CostReport, *, status: str | None = None,
                    exit_code: int | None = None) -> RunRecord:
        """The history row of a cost report (status/exit code override the report's)."""
        started = report.started_at or report.launched_at
        verified = bool(report.termination_verified and report.terminated_at)
        return cls(
            run_id=report.run_id,
            job=report.job,
            tier=report.tier,
            model=report.model,
            provider=report.provider,
            instance_type=report.instance_type,
            region=report.region,
            status=status or report.status,
            exit_code=exit_code if exit_code is not None else report.exit_code,
            started_at=parse_time(started) if started else datetime.now(UTC),
            duration_seconds=report.duration_seconds,
            cost_usd=report.cost_usd,
            phases={p.name: round(p.seconds, 3) for p in report.phases},
            billed_seconds=report.billed_seconds,
            price_per_hour=report.price_per_hour,
            estimated_cost_usd=report.estimated_cost_usd,
            spot=report.spot,
            commit=report.ci.commit,
            ci_run_id=report.ci.run_id,
            repository=report.ci.repository,
            launched_at=parse_time(report.launched_at) if report.launched_at else None,
            ended_at=parse_time(report.terminated_at) if verified else None,
            termination_verified=verified,
            phase_starts=phase_starts(report),
        )

    def _row(self, source: str) -> tuple:
        for moment in (self.started_at, self.launched_at, self.ended_at):
            if moment is not None and moment.tzinfo is None:
                raise ValueError("naive datetime: ephemera works in UTC only")
        return (
            self.run_id, self.job, self.tier, self.model, self.provider, self.instance_type,
            self.region, int(self.spot), self.status, self.exit_code,
            self.started_at.timestamp(), self.duration_seconds, self.billed_seconds,
            self.price_per_hour, self.cost_usd, self.estimated_cost_usd,
            json.dumps(self.phases, sort_keys=True), self.commit, self.ci_run_id,
            self.repository, source, time.time(),
            self.launched_at.timestamp() if self.launched_at else None,
            self.ended_at.timestamp() if self.ended_at else None,
            int(self.termination_verified),
            json.dumps(self.phase_starts, sort_keys=True),
        )


def phase_starts(report: CostReport) -> dict[str, float]:
    """Each phase's start in seconds from the run's start (its first phase)."""
    origin = parse_time(report.started_at) if report.started_at else None
    out: dict[str, float] = {}
    for phase in report.phases:
        if origin is not None and phase.started_at:
            out[phase.name] = round((parse_time(phase.started_at) - origin).total_seconds(), 3)
    return out


_COLUMNS = ("run_id, job, tier, model, provider, instance_type, region, spot, status, "
            "exit_code, started_at, duration_seconds, billed_seconds, price_per_hour, cost_usd, "
            "estimated_cost_usd, phases, commit_sha, ci_run_id, repository, source, recorded_at, "
            "launched_at, ended_at, termination_verified, phase_starts")
_PLACEHOLDERS = ", ".join("?" * len(_COLUMNS.split(", ")))


@dataclass(frozen=True)
class GroupRow:
    """Totals for one group of runs in ``ephemera cost``."""

    key: str
    runs: int
    passed: int
    failed: int                    # every run that did not pass
    pass_rate: float               # passed / runs
    cost_usd: float
    mean_duration_seconds: float
    billed_seconds: float


# ---- connection --------------------------------------------------------------------

def history_path() -> Path:
    return get_settings().history_path


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"history database {path}: cannot create its directory: {exc}",
                          hint="Set EPHEMERA_HISTORY_DB or EPHEMERA_DATA_DIR to a writable place.") from None
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    # A damaged file may hold text that is not UTF-8: read it, never crash on it.
    conn.text_factory = lambda raw: raw.decode("utf-8", errors="replace")
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # In WAL mode NORMAL never corrupts the file; a power cut may lose the last run's
    # row, which `ephemera cost --import` can restore from its cost.json.
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def with_retry(path: Path, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``work`` on a fresh connection, retrying while another writer holds the lock."""
    delay = 0.05
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            with closing(_connect(path)) as conn:
                _ensure_schema(conn, path)
                return work(conn)
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or attempt == WRITE_ATTEMPTS:
                raise InfraError(f"history database {path}: {exc}") from None
            time.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 1.0)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: SQLite's message quotes bytes of a damaged schema.
            raise InfraError(f"history database {path} is not usable: {exc}",
                             hint="Move the file away to start a new history.") from None
    raise AssertionError("unreachable")


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise InfraError(f"history database {path} was written by a newer ephemera "
                         f"(schema {version}, this one knows {SCHEMA_VERSION})")
    # WAL lets readers go on while a writer writes; it is a property of the file.
    conn.execute("PRAGMA journal_mode = WAL")
    with Transaction(conn):
        # Another process may have created the schema while this one waited for the lock.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version < 1:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@dataclass
class Transaction:
    conn: sqlite3.Connection

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


# ---- writes ------------------------------------------------------------------------

def record_run(record: RunRecord, *, path: Path | None = None) -> None:
    """Add (or replace) the row of one run."""
    path = path or history_path()
    row = record._row("run")

    def work(conn: sqlite3.Connection) -> None:
        with Transaction(conn):
            conn.execute(f"INSERT OR REPLACE INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", row)

    with_retry(path, work)


def record_teardown(run_id: str, *, ended_at: datetime | None, fallback: RunRecord,
                    min_billed_seconds: int = 0, path: Path | None = None) -> str:
    """Record that the teardown of ``run_id`` finished at ``ended_at`` (None: it could
    not be verified). The run's row gets its end time, verified flag, and billed time and
    cost recomputed up to the end (never lowered); a run with no row yet (its process was
    killed before it could report) gets ``fallback``. Returns "updated", "added" or
    "unchanged"."""
    path = path or history_path()
    if ended_at is not None and ended_at.tzinfo is None:
        raise ValueError("naive datetime: ephemera works in UTC only")

    def work(conn: sqlite3.Connection) -> str:
        with Transaction(conn):
            row = conn.execute(
                "SELECT COALESCE(launched_at, started_at), price_per_hour FROM runs "
                "WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                conn.execute(f"INSERT INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
                             fallback._row("down"))
                return "added"
            if ended_at is None:
                return "unchanged"
            launched, price = as_number(row[0]), as_number(row[1])
            billed = billed_seconds(launched, ended_at.timestamp(), min_billed_seconds)
            conn.execute(
                "UPDATE runs SET ended_at = ?, termination_verified = 1, "
                "billed_seconds = MAX(billed_seconds, ?), cost_usd = MAX(cost_usd, ?) "
                "WHERE run_id = ?",
                (ended_at.timestamp(), billed, billed * price / 3600.0, run_id))
            return "updated"

    return with_retry(path, work)


def billed_seconds(launched: float, ended: float, minimum: int = 0) -> float:
    """Per-second billing from launch to end, rounded up, with the provider's minimum."""
    if not (math.isfinite(launched) and math.isfinite(ended)) or ended <= launched:
        return float(minimum)
    return float(max(math.ceil(ended - launched - 1e-9), minimum))


def as_number(value: object) -> float:
    """A REAL column as a float (0.0 for anything a damaged row holds instead)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class ImportResult:
    added: int
    already_present: int
    files: int


def expand_cost_paths(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files as given; directories are searched for ``cost.json`` files (CI artifacts
    download as a tree of run directories)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(path.rglob("cost.json"))
        else:
            yield path


def import_cost_files(paths: Iterable[str | os.PathLike[str]], *,
                      path: Path | None = None) -> ImportResult:
    """Merge ``cost.json`` files into the history. A run already present (same run id)
    is left as it is, so importing the same artifacts twice changes nothing. Every
    file is read and checked before anything is written."""
    db = path or history_path()
    files = list(expand_cost_paths(paths))
    if not files:
        raise ConfigError("--import: no cost.json files found in the given paths")
    rows = [RunRecord.from_report(CostReport.from_json(f))._row("import") for f in files]

    def work(conn: sqlite3.Connection) -> int:
        added = 0
        with Transaction(conn):
            for row in rows:
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", row)
                added += cur.rowcount
        return added

    added = with_retry(db, work)
    return ImportResult(added=added, already_present=len(rows) - added, files=len(files))


# ---- reads -------------------------------------------------------------------------

def summarize(since_seconds: float | None, by: str | None, *, path: Path | None = None,
              now: float | None = None) -> list[GroupRow]:
    """Totals, counts, pass rate and mean duration per group of runs that started in
    the last ``since_seconds`` (None: all). ``by`` None gives one group, "all"."""
    if by not in _GROUP_SQL:
        raise ConfigError(f"--by: '{by}' is not one of {', '.join(GROUPINGS)}")
    db = path or history_path()
    if not db.exists():
        return []
    cutoff = -1e18 if since_seconds is None else (now if now is not None else time.time()) - since_seconds
    key = _GROUP_SQL[by]
    sql = (
        f"SELECT {key} AS k, COUNT(*), SUM(status = 'passed'), SUM(cost_usd), "
        f"AVG(duration_seconds), SUM(billed_seconds) FROM runs WHERE started_at >= ? "
        f"GROUP BY k ORDER BY SUM(cost_usd) DESC, k"
    )
    if by == "day":
        sql = sql.replace("ORDER BY SUM(cost_usd) DESC, k", "ORDER BY k")

    def work(conn: sqlite3.Connection) -> list[GroupRow]:
        out = []
        for k, runs, passed, cost, mean, billed in conn.execute(sql, (cutoff,)):
            passed = int(passed or 0)
            out.append(GroupRow(key=str(k), runs=runs, passed=passed, failed=runs - passed,
                                pass_rate=passed / runs if runs else 0.0,
                                cost_usd=float(cost or 0.0),
                                mean_duration_seconds=float(mean or 0.0),
                                billed_seconds=float(billed or 0.0)))
        return out

    return with_retry(db, work)


def get_run(run_id: str, *, path: Path | None = None) -> dict | None:
    """One row as a dict (None when absent), for checks and ``--json`` output."""
    db = path or history_path()
    if not db.exists():
        return None

    def work(conn: sqlite3.Connection) -> dict | None:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        data = dict(row)
        for column in ("phases", "phase_starts"):
            try:
                data[column] = json.loads(data[column])
            except (TypeError, ValueError, RecursionError):
                raise InfraError(f"history database {db}: run {run_id}: column '{column}' is "
                                 "not JSON", hint="Move the file away to start a new history.") from None
        return data

    return with_retry(db, work)


def count_runs(*, path: Path | None = None) -> int:
    db = path or history_path()
    if not db.exists():
        return 0
    return with_retry(db, lambda conn: conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
