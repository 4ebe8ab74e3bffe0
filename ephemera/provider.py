"""The provider contract: what every plugin implements, and the values it trades in.

A provider turns a :class:`LaunchSpec` into an :class:`Instance` and back into
nothing. It never sleeps or waits: ``launch`` returns at once, ``poll`` says how
far the instance has come, and the controller (``ephemera.lifecycle.controller``) owns every
wait, deadline and retry. ``terminate`` must be idempotent: an instance that is
already gone is a success.

Plugins register under the entry-point group ``ephemera.providers`` (see
``ephemera.registry``); the built-in ones do the same.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.transport.remote import Remote

# Canonical label keys. Each provider spells them as its platform allows
# (Docker: "dev.ephemera.run-id"; AWS tags: "ephemera:run-id").
LABEL_RUN_ID = "run-id"
LABEL_JOB = "job"
LABEL_OWNER = "owner"
LABEL_EXPIRES_AT = "expires-at"
LABEL_KEYS = (LABEL_RUN_ID, LABEL_JOB, LABEL_OWNER, LABEL_EXPIRES_AT)


def make_labels(run_id: str, job: str, owner: str, expires_at: datetime) -> dict[str, str]:
    """The four labels every instance carries, with canonical (unprefixed) keys."""
    return {
        LABEL_RUN_ID: run_id,
        LABEL_JOB: job,
        LABEL_OWNER: owner,
        LABEL_EXPIRES_AT: format_time(expires_at),
    }


def format_time(moment: datetime) -> str:
    """ISO 8601 in UTC with a Z, to the second: 2026-11-21T23:00:00Z."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: ephemera works in UTC only")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time` (accepts any ISO 8601 with an offset or Z)."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class InstanceState(enum.StrEnum):
    PENDING = "pending"        # asked for, not running yet
    RUNNING = "running"        # running, not reachable yet
    READY = "ready"            # reachable: Instance.endpoint / workdir are filled in
    TERMINATING = "terminating"
    TERMINATED = "terminated"  # gone (or never existed)
    FAILED = "failed"          # will never become ready (Instance.message says why)


@dataclass(frozen=True)
class Offer:
    """One kind of machine a provider can give, with its price.

    ``gpu_memory_gib`` is the memory of ONE GPU as the driver reports it (usable,
    below the nominal figure). A CPU-only offer has ``gpu_count == 0`` and no GPU.
    ``compute_capability`` is the GPU's CUDA compute capability (7.5 for a T4, 8.9 for
    an L4), None when the source does not say; the planner then goes by the GPU's name.
    """

    provider: str
    instance_type: str
    region: str | None
    gpu: str | None
    gpu_count: int
    gpu_memory_gib: float
    vcpus: int
    memory_gib: float
    price_per_hour: float
    spot: bool = False
    price_source: str = ""  # e.g. "built-in catalog 2026-11-01", "live", "catalog file x.csv"
    compute_capability: float | None = None

    @property
    def cpu_only(self) -> bool:
        return self.gpu_count == 0


@dataclass(frozen=True)
class OfferRequest:
    """Filters a provider may apply when listing offers (it may also ignore them)."""

    regions: tuple[str, ...] = ()
    spot: bool = False
    gpu: str | None = None
    instance_type: str | None = None
    max_price_per_hour: float | None = None
    # The job's resources section (as in LaunchSpec.options), for providers whose offers
    # depend on it (e.g. the ssh provider's target host).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    """How to reach an instance over SSH."""

    host: str
    port: int = 22
    user: str = "root"
    key_path: str | None = None          # private key file
    host_key: str | None = None          # pinned host key ("ssh-ed25519 AAAA..."), when known
    proxy_jump: str | None = None        # user@host:port of a bastion, when needed


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a provider needs to launch one instance for one run."""

    run_id: str
    job_name: str
    offer: Offer
    image: str                            # the job's image ("host" = run on the host itself)
    labels: Mapping[str, str]             # canonical keys (LABEL_KEYS) plus user labels
    expires_at: datetime                  # dead-man switch: the instance must end itself here
    ssh_public_key: str | None = None     # for providers that inject keys
    ssh_private_key_path: str | None = None
    disk_gib: int | None = None
    gpu_count: int = 0                    # GPUs to attach (the plan's tensor-parallel size or more)
    ports: tuple[int, ...] = ()           # ports on the instance the controller will reach
    env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # provider section of the job


@dataclass(frozen=True)
class Instance:
    """A launched machine, as far as ephemera knows. Serialisable (see to_dict).

    ``data`` holds whatever the provider needs to find or end the instance again
    from another process (region, group ids, key names, pids): plain strings only,
    since it is written to the run's state file.
    """

    provider: str
    id: str
    run_id: str
    state: InstanceState
    labels: Mapping[str, str] = field(default_factory=dict)
    instance_type: str = ""
    region: str | None = None
    endpoint: Endpoint | None = None
    workdir: str | None = None
    launched_at: datetime | None = None
    message: str = ""
    data: Mapping[str, str] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> Instance:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "id": self.id,
            "run_id": self.run_id,
            "state": self.state.value,
            "labels": dict(self.labels),
            "instance_type": self.instance_type,
            "region": self.region,
            "endpoint": dataclasses.asdict(self.endpoint) if self.endpoint else None,
            "workdir": self.workdir,
            "launched_at": format_time(self.launched_at) if self.launched_at else None,
            "message": self.message,
            "data": dict(self.data),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Instance:
        endpoint = raw.get("endpoint")
        launched = raw.get("launched_at")
        return cls(
            provider=raw["provider"],
            id=raw["id"],
            run_id=raw["run_id"],
            state=InstanceState(raw.get("state", "running")),
            labels=dict(raw.get("labels") or {}),
            instance_type=raw.get("instance_type", ""),
            region=raw.get("region"),
            endpoint=Endpoint(**endpoint) if endpoint else None,
            workdir=raw.get("workdir"),
            launched_at=parse_time(launched) if launched else None,
            message=raw.get("message", ""),
            data=dict(raw.get("data") or {}),
        )


class Runs(enum.StrEnum):
    """Where the job's server and suite run, as the controller needs to know it."""

    IMAGE = "image"                  # the instance is a container of the job's image (docker)
    THIS_MACHINE = "this-machine"    # processes on the machine ephemera runs on (local)
    MACHINE = "machine"              # a machine that runs the image through its own Docker,
    #                                  or directly with ``image: host`` (ssh, aws, slurm)


class PortChoice(enum.StrEnum):
    """How the server's port is chosen when the job does not set one."""

    FIXED = "fixed"                  # the default port: the machine (or network) is the run's own
    FREE_HERE = "free-here"          # a free port on this machine (shared with other runs)
    FREE_ON_MACHINE = "free-on-machine"  # a free port on the machine, asked over its channel


class BuiltinImage(enum.StrEnum):
    """How the built-in CPU image (``ephemera/cpu``) is made ready for the provider."""

    CPU_ENV = "cpu-env"              # no image: the CPU environment is built on this machine
    LOCAL_ENGINE = "local-engine"    # built into this machine's Docker engine
    ON_MACHINE = "on-machine"        # the machine's Docker must have it already


@dataclass(frozen=True)
class Capabilities:
    """What a provider declares so the controller never needs to know it by name.

    ``container_network`` (``Runs.MACHINE`` only): ``host`` on a machine of the run's own,
    ``bridge`` on a shared one (the server's port published on its 127.0.0.1 only).
    ``server_bind``: the address the server listens on where it runs.
    ``pulls_before_launch``: the provider pulls the image itself before the launch
    (``pull_image``), so a cancel during a pull is not held by a launch in flight.
    ``reaps_orphans``: the provider has ``reap_orphans`` for resources without an instance.
    ``boot_dir``: where work the machine starts at boot (the image pull, a weights download
    that needs no token) writes its request, log, pid and exit status, one directory per
    task (``pull``, ``weights``); None where nothing starts at boot.
    """

    runs: Runs = Runs.MACHINE
    needs_ssh_key: bool = False
    port: PortChoice = PortChoice.FIXED
    server_bind: str = "127.0.0.1"
    container_network: str = "host"
    builtin_image: BuiltinImage = BuiltinImage.ON_MACHINE
    min_billed_seconds: int = 0
    pulls_before_launch: bool = False
    reaps_orphans: bool = False
    boot_dir: str | None = None

    def __post_init__(self) -> None:
        if self.container_network not in ("host", "bridge"):
            raise ValueError(f"container_network must be host or bridge, not {self.container_network!r}")
        if self.min_billed_seconds < 0:
            raise ValueError("min_billed_seconds must be 0 or more")


@runtime_checkable
class Provider(Protocol):
    """What a provider plugin implements. See the module docstring for the rules."""

    name: ClassVar[str]

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        """How this provider's machines run things, for a job's ``resources`` (as JSON)."""
        ...

    def offers(self, request: OfferRequest) -> list[Offer]:
        """Machines this provider can launch now, with prices. May be empty."""
        ...

    def launch(self, spec: LaunchSpec) -> Instance:
        """Start launching; return at once. Idempotent on ``spec.run_id``: a second call
        for the same run returns the instance of the first."""
        ...

    def poll(self, instance: Instance) -> Instance:
        """Current state, never blocking. When READY, ``endpoint``/``workdir`` are set."""
        ...

    def terminate(self, instance: Instance) -> None:
        """End the instance and everything the run created. Already gone = success.
        Must work from an Instance read back from a state file in another process."""
        ...

    def find(self, labels: Mapping[str, str]) -> list[Instance]:
        """Instances carrying all these labels (canonical keys), for the reaper."""
        ...

    def connect(self, instance: Instance) -> Remote:
        """A channel to run commands on and copy files to/from a READY instance."""
        ...


class ImagePuller(Protocol):
    """Providers that declare ``pulls_before_launch`` implement this too."""

    def pull_image(self, name: str, progress: Callable[[str], None] | None = None) -> str: ...


class OrphanReaper(Protocol):
    """Providers that declare ``reaps_orphans`` implement this too: resources a run left
    without an instance (security groups, key pairs), as dicts for the reap report."""

    def reap_orphans(self, *, now: datetime, owner: str | None,
                     dry_run: bool) -> list[dict[str, Any]]: ...


class ProviderInfo(Protocol):
    """Optional: a provider may describe itself for ``ephemera providers``."""

    def describe(self) -> str: ...
