"""Where a run may have left something: the regions it tried, on disk.

Launch tries the offer's region, then the job's or the settings' other regions. If the
launching process dies (SIGKILL, a lost RunInstances reply), a later ``ephemera down``
or ``reap`` in another process must look in every one of them, not only in the regions
its own settings name. So before each attempt in a region, the provider adds that
region (and the options that decide where things go: subnets, profile) to a small JSON
file per run, ``<state_dir>/aws/<run-id>.json``, written atomically. ``find`` reads it.

Records are removed by a complete ``reap`` search once the run has expired and nothing
of it was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ephemera.lifecycle.state import write_json_atomic
from ephemera.provider import format_time, parse_time

_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def records_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "aws"


def record_path(state_dir: Path, run_id: str) -> Path:
    if not _SAFE_RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} cannot name a file")
    return records_dir(state_dir) / f"{run_id}.json"


def read_record(state_dir: Path, run_id: str) -> dict[str, Any]:
    """The run's record, or an empty one when there is none or it cannot be read."""
    try:
        raw = json.loads(record_path(state_dir, run_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def recorded_regions(state_dir: Path, run_id: str) -> list[str]:
    regions = read_record(state_dir, run_id).get("regions")
    return [r for r in regions if isinstance(r, str)] if isinstance(regions, list) else []


def add_region(state_dir: Path, run_id: str, region: str, *, expires_at: datetime,
               options: Mapping[str, Any]) -> Path:
    """Add ``region`` to the run's record (raises OSError when it cannot be written)."""
    record = read_record(state_dir, run_id)
    regions = recorded_regions(state_dir, run_id)
    if region not in regions:
        regions.append(region)
    record.update({"run_id": run_id, "regions": regions, "expires_at": format_time(expires_at),
                   "options": {**(record.get("options") or {}), **dict(options)}})
    return write_json_atomic(record_path(state_dir, run_id), record)


def all_records(state_dir: Path) -> dict[str, dict[str, Any]]:
    """run id -> record, for every readable record."""
    directory = records_dir(state_dir)
    out: dict[str, dict[str, Any]] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        record = read_record(state_dir, path.stem)
        if record:
            out[path.stem] = record
    return out


def all_recorded_regions(state_dir: Path) -> list[str]:
    regions: list[str] = []
    for record in all_records(state_dir).values():
        regions += [r for r in record.get("regions") or [] if isinstance(r, str)]
    return list(dict.fromkeys(regions))


def prune(state_dir: Path, *, now: datetime, keep_run_ids: Iterable[str]) -> list[str]:
    """Remove the records of expired runs that are not in ``keep_run_ids`` (runs of which
    something was still found). Returns the run ids removed."""
    keep = set(keep_run_ids)
    removed = []
    for run_id, record in all_records(state_dir).items():
        try:
            expired = parse_time(str(record.get("expires_at"))) < now
        except ValueError:
            continue
        if expired and run_id not in keep:
            record_path(state_dir, run_id).unlink(missing_ok=True)
            removed.append(run_id)
    return removed
