"""Run state files: what a later ``ephemera down`` needs to finish a teardown.

One JSON file per run in ``<state_dir>/runs/<run-id>.json``, written atomically
BEFORE the launch call (so a run killed mid-launch can still be found by its
labels) and again as soon as the provider returns the instance.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ephemera.provider import Instance, format_time, parse_time

ACTIVE = ("launching", "active", "tearing-down")


@dataclass
class RunState:
    run_id: str
    job: str
    provider: str
    labels: dict[str, str]
    expires_at: datetime
    status: str = "launching"        # launching | active | tearing-down | terminated | teardown-failed
    instance: Instance | None = None
    ssh_key_path: str | None = None
    artifacts_dir: str | None = None
    provider_options: dict[str, Any] = field(default_factory=dict)
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job": self.job,
            "provider": self.provider,
            "labels": self.labels,
            "expires_at": format_time(self.expires_at),
            "status": self.status,
            "instance": self.instance.to_dict() if self.instance else None,
            "ssh_key_path": self.ssh_key_path,
            "artifacts_dir": self.artifacts_dir,
            "provider_options": self.provider_options,
            "updated_at": format_time(self.updated_at),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunState:
        return cls(
            run_id=raw["run_id"],
            job=raw.get("job", ""),
            provider=raw["provider"],
            labels=dict(raw.get("labels") or {}),
            expires_at=parse_time(raw["expires_at"]),
            status=raw.get("status", "launching"),
            instance=Instance.from_dict(raw["instance"]) if raw.get("instance") else None,
            ssh_key_path=raw.get("ssh_key_path"),
            artifacts_dir=raw.get("artifacts_dir"),
            provider_options=dict(raw.get("provider_options") or {}),
            updated_at=parse_time(raw["updated_at"]) if raw.get("updated_at") else datetime.now(UTC),
        )


def runs_dir(state_dir: Path) -> Path:
    return state_dir / "runs"


def state_path(state_dir: Path, run_id: str) -> Path:
    return runs_dir(state_dir) / f"{run_id}.json"


def save_state(state_dir: Path, state: RunState) -> Path:
    """Write atomically (temp file + rename + fsync) so a kill never leaves half a file."""
    state.updated_at = datetime.now(UTC)
    directory = runs_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = state_path(state_dir, state.run_id)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{state.run_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state.to_dict(), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_state(state_dir: Path, run_id: str) -> RunState | None:
    path = state_path(state_dir, run_id)
    if not path.exists():
        return None
    return RunState.from_dict(json.loads(path.read_text(encoding="utf-8")))


def list_states(state_dir: Path) -> list[RunState]:
    directory = runs_dir(state_dir)
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            out.append(RunState.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, OSError):
            continue  # a foreign or damaged file: never crash `down --all` on it
    return out
