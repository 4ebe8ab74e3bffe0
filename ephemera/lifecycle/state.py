"""Run state files: what a later ``ephemera down`` needs to finish a teardown.

One JSON file per run in ``<state_dir>/runs/<run-id>.json``, written atomically
BEFORE the launch call (so a run killed mid-launch can still be found by its
labels) and again as soon as the provider returns the instance.

The file also names the ephemera process that owns the run (pid, the process's start
time and the host), so that ``ephemera down --all`` can leave alone a run that is
still going on this machine.

Reading is strict and bounded: a file that is not a state file (``null``, a list,
wrong types, a huge or deeply nested document, a damaged instance) raises
:class:`~ephemera.errors.ConfigError` naming the file and the field. Keys this
version does not know are kept as they are, so an older ephemera that rewrites the
file of a newer one loses nothing.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ephemera.errors import ConfigError
from ephemera.provider import Endpoint, Instance, InstanceState, format_time, parse_time

ACTIVE = ("launching", "active", "tearing-down")
STATUSES = (*ACTIVE, "terminated", "teardown-failed")
MAX_STATE_BYTES = 1 << 20   # real files are a few KiB


# ---- the process that owns a run ------------------------------------------------------

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """An identity for a running process that a recycled pid does not share: the boot
    id and the process's start time in clock ticks since boot (Linux). None when the
    process does not exist or the system has no /proc."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return f"{_boot_id()}:{fields[19]}"


def _host() -> str:
    return socket.gethostname()


def owner_alive(state: RunState) -> bool:
    """True when the ephemera process that wrote ``state`` is still running on this
    machine (the same pid with the same start time, so not a recycled pid)."""
    if state.pid is None or state.host != _host():
        return False
    if state.pid_start:
        return process_start(state.pid) == state.pid_start
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the state of one run -------------------------------------------------------------

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
    created_at: datetime | None = field(default_factory=lambda: datetime.now(UTC))
    # The ephemera process that owns the run (by default: the one creating this object).
    pid: int | None = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: process_start(os.getpid()))
    host: str | None = field(default_factory=_host)
    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at <= (now or datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
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
            "created_at": format_time(self.created_at) if self.created_at else None,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "host": self.host,
        }

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "state file") -> RunState:
        """Check and convert a decoded state file; ConfigError names the bad field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {_json_type(raw)}")
        try:
            data = _StateFile.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_first_error(exc)}") from None
        known = set(_StateFile.model_fields)
        return cls(
            run_id=data.run_id,
            job=data.job,
            provider=data.provider,
            labels=dict(data.labels),
            expires_at=_time(data.expires_at, "expires_at", source),
            status=data.status,
            instance=data.instance.to_instance(source) if data.instance else None,
            ssh_key_path=data.ssh_key_path,
            artifacts_dir=data.artifacts_dir,
            provider_options=dict(data.provider_options),
            updated_at=(_time(data.updated_at, "updated_at", source) if data.updated_at
                        else datetime.now(UTC)),
            created_at=(_time(data.created_at, "created_at", source) if data.created_at
                        else None),
            pid=data.pid,
            pid_start=data.pid_start,
            host=data.host,
            extra={k: v for k, v in raw.items() if k not in known},
        )


# ---- the file's layout (checked with pydantic, strict types, unknown keys allowed) -----

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _EndpointFile(_Strict):
    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    key_path: str | None = None
    host_key: str | None = None
    proxy_jump: str | None = None


class _InstanceFile(_Strict):
    provider: str
    id: str = Field(min_length=1)
    run_id: str
    state: Annotated[InstanceState, Field(strict=False)] = InstanceState.RUNNING
    labels: dict[str, str] = Field(default_factory=dict)
    instance_type: str = ""
    region: str | None = None
    endpoint: _EndpointFile | None = None
    workdir: str | None = None
    launched_at: str | None = None
    message: str = ""
    data: dict[str, str] = Field(default_factory=dict)

    def to_instance(self, source: str) -> Instance:
        return Instance(
            provider=self.provider, id=self.id, run_id=self.run_id, state=self.state,
            labels=dict(self.labels), instance_type=self.instance_type, region=self.region,
            endpoint=Endpoint(**self.endpoint.model_dump()) if self.endpoint else None,
            workdir=self.workdir,
            launched_at=(_time(self.launched_at, "instance.launched_at", source)
                         if self.launched_at else None),
            message=self.message, data=dict(self.data),
        )


class _StateFile(_Strict):
    run_id: str = Field(min_length=1, max_length=200)
    job: str = ""
    provider: str = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    expires_at: str
    status: str = "launching"
    instance: _InstanceFile | None = None
    ssh_key_path: str | None = None
    artifacts_dir: str | None = None
    provider_options: dict[str, Any] = Field(default_factory=dict)
    updated_at: str | None = None
    created_at: str | None = None
    pid: int | None = Field(None, ge=1, le=2**31)
    pid_start: str | None = None
    host: str | None = None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    return f"field '{where}': {error['msg']}"


def _time(text: str, name: str, source: str) -> datetime:
    try:
        return parse_time(text)
    except (ValueError, OverflowError, TypeError) as exc:
        raise ConfigError(f"{source}: field '{name}': not a time ({exc})") from None


# ---- files ---------------------------------------------------------------------------

def runs_dir(state_dir: Path) -> Path:
    return state_dir / "runs"


def state_path(state_dir: Path, run_id: str) -> Path:
    return runs_dir(state_dir) / f"{run_id}.json"


def save_state(state_dir: Path, state: RunState) -> Path:
    """Write atomically (temp file + rename + fsync) so a kill never leaves half a file."""
    state.updated_at = datetime.now(UTC)
    return write_json_atomic(state_path(state_dir, state.run_id), state.to_dict(), indent=2)


def write_json_atomic(path: Path, data: Any, *, indent: int = 1) -> Path:
    """Write ``data`` as JSON to ``path`` (mode 0600) through a temporary file, fsync
    and a rename, so a kill at any moment leaves the old file or the new one, never
    half of one. Used for every record ephemera keeps about its runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_state_file(path: Path) -> RunState:
    """One state file, checked. Raises ConfigError for anything that is not one."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_STATE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_STATE_BYTES} bytes: not a state file")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:   # e.g. a 5,000-digit number, deep nesting
        raise ConfigError(f"{path}: not a usable JSON document ({type(exc).__name__})") from None
    state = RunState.from_dict(raw, source=str(path))
    if state.run_id != path.stem:
        raise ConfigError(f"{path}: field 'run_id': '{state.run_id}' does not match the "
                          "file's name")
    return state


def load_state(state_dir: Path, run_id: str) -> RunState | None:
    """The run's state, None when it has no state file; ConfigError when it is bad."""
    path = state_path(state_dir, run_id)
    if not path.exists():
        return None
    return read_state_file(path)


def read_states(state_dir: Path) -> tuple[list[RunState], list[str]]:
    """Every readable state file, and one problem line per file that is not one (never
    a reason to stop reading the others)."""
    directory = runs_dir(state_dir)
    if not directory.is_dir():
        return [], []
    states: list[RunState] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            states.append(read_state_file(path))
        except ConfigError as exc:
            problems.append(exc.message)
    return states, problems


def list_states(state_dir: Path) -> list[RunState]:
    """The readable state files (damaged ones are left out; see :func:`read_states`)."""
    return read_states(state_dir)[0]
