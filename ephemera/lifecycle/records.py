"""What a run records about itself: its id, its phases with their times, and its result
(what ``ephemera run --json`` prints)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ephemera.lifecycle.phase_times import phase_rows
from ephemera.sizing.plan import Plan


def new_run_id(job_name: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{job_name[:30].rstrip('-')}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@dataclass
class PhaseRecord:
    name: str
    started_at: datetime
    ended_at: datetime | None = None
    ok: bool = False

    @property
    def seconds(self) -> float:
        end = self.ended_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()


@dataclass
class RunResult:
    run_id: str
    status: str                    # passed | failed | error | timeout | interrupted | dry-run
    exit_code: int
    job: str
    tier: str | None
    provider: str
    instance_type: str | None = None
    region: str | None = None
    artifacts_dir: str | None = None
    message: str = ""
    phases: list[PhaseRecord] = field(default_factory=list)
    plan: Plan | None = None
    cost: dict[str, Any] | None = None
    teardown_verified: bool | None = None
    server_command: str | None = None
    suite_command: str | None = None
    judgement: dict[str, Any] | None = None   # results, benchmark, gates (ephemera.results.gates)
    started_at: datetime | None = None        # the run's start: phases' start offsets count from it

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "job": self.job,
            "tier": self.tier,
            "provider": self.provider,
            "instance_type": self.instance_type,
            "region": self.region,
            "artifacts_dir": self.artifacts_dir,
            "message": self.message,
            "phases": phase_rows(self.phases, self.started_at),
            "cost": self.cost,
            "teardown_verified": self.teardown_verified,
            "server_command": self.server_command,
            "suite_command": self.suite_command,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            **(self.judgement or {}),
        }
