"""``dirhost``: a provider plugin that lives outside ephemera's own packages.

It stands for a third-party plugin (a GPU marketplace, a cluster): registered through
the ``ephemera.providers`` entry point, it says how its machine runs things through
:class:`ephemera.provider.Capabilities` and gets the whole lifecycle from that alone.
Its "machine" is a directory on this host (``$DIRHOST_ROOT`` or the state directory),
shared with other runs: the job's image runs through this host's Docker on a bridge
network with a free port, and a run is billed with a 30 s minimum.

Launch makes ``<root>/<run-id>`` with ``labels.json`` and starts a detached sleeper that
removes the run at its expiry (the dead-man switch); terminate removes the run's
containers, ends the process groups that carry the run's id and removes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from ephemera.provider import (
    LABEL_RUN_ID,
    Capabilities,
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    OfferRequest,
    PortChoice,
    Runs,
)
from ephemera.transport.remote import Remote

NAME = "dirhost"
PRICE_PER_HOUR = 0.5


def _root() -> Path:
    from ephemera.spec.settings import get_settings

    return Path(os.environ.get("DIRHOST_ROOT") or get_settings().state_dir / NAME)


class DirHostProvider:
    name: ClassVar[str] = NAME

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        return Capabilities(runs=Runs.MACHINE, port=PortChoice.FREE_ON_MACHINE,
                            container_network="bridge", min_billed_seconds=30)

    @classmethod
    def check(cls) -> tuple[bool, str]:
        return True, f"directories under {_root()}"

    def offers(self, request: OfferRequest) -> list[Offer]:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return [Offer(provider=NAME, instance_type="dirhost.cpu", region=None, gpu=None,
                      gpu_count=0, gpu_memory_gib=0.0, vcpus=os.cpu_count() or 1,
                      memory_gib=round(memory, 1), price_per_hour=PRICE_PER_HOUR,
                      price_source="dirhost flat rate")]

    def launch(self, spec: LaunchSpec) -> Instance:
        workdir = _root() / spec.run_id
        if (workdir / "labels.json").exists():
            return self._instance(workdir)
        workdir.mkdir(parents=True, mode=0o700)
        (workdir / ".pgids").touch()
        record = {"run_id": spec.run_id, "labels": dict(spec.labels),
                  "launched_at": datetime.now(UTC).isoformat()}
        (workdir / "labels.json").write_text(json.dumps(record))
        seconds = max(1, int(spec.expires_at.timestamp() - datetime.now(UTC).timestamp()))
        sleeper = subprocess.Popen(
            ["sh", "-c", f'sleep {seconds}; rm -rf -- "$0"', str(workdir)],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        (workdir / ".watchdog").write_text(str(sleeper.pid))
        return self._instance(workdir)

    def _instance(self, workdir: Path) -> Instance:
        record = json.loads((workdir / "labels.json").read_text())
        return Instance(provider=NAME, id=f"dirhost-{record['run_id']}", run_id=record["run_id"],
                        state=InstanceState.READY, labels=dict(record["labels"]),
                        instance_type="dirhost.cpu", workdir=str(workdir),
                        launched_at=datetime.fromisoformat(record["launched_at"]))

    def poll(self, instance: Instance) -> Instance:
        workdir = _root() / instance.run_id
        if not (workdir / "labels.json").exists():
            return instance.evolve(state=InstanceState.TERMINATED, message="directory removed")
        return instance.evolve(state=InstanceState.READY, workdir=str(workdir))

    def terminate(self, instance: Instance) -> None:
        workdir = _root() / instance.run_id
        if shutil.which("docker"):
            listed = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label=dev.ephemera.run-id={instance.run_id}"],
                capture_output=True, text=True, timeout=60)
            ids = listed.stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)
        for pgid in _recorded(workdir / ".pgids"):
            if _carries(pgid, instance.run_id):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        watchdog = _recorded(workdir / ".watchdog")
        for pid in watchdog:
            if _cmdline(pid).endswith(str(workdir)):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)

    def find(self, labels: Mapping[str, str]) -> list[Instance]:
        root = _root()
        found = []
        for path in sorted(root.glob("*/labels.json")) if root.is_dir() else []:
            try:
                instance = self._instance(path.parent)
            except (OSError, ValueError, KeyError):
                continue
            if all(instance.labels.get(k) == v for k, v in labels.items()):
                found.append(instance)
        return found

    def connect(self, instance: Instance) -> Remote:
        from ephemera_providers.local import LocalRemote

        workdir = Path(instance.workdir or _root() / instance.run_id)
        return LocalRemote(workdir, workdir / ".pgids", run_id=instance.labels.get(LABEL_RUN_ID,
                                                                                    instance.run_id))


def _recorded(path: Path) -> list[int]:
    try:
        words = path.read_text().split()
    except OSError:
        return []
    return [int(w) for w in words if w.isdigit() and int(w) > 1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _carries(pgid: int, run_id: str) -> bool:
    """The group is the run's: its leader has the run's id in its environment."""
    try:
        environ = Path(f"/proc/{pgid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"EPHEMERA_RUN_ID={run_id}".encode() in environ
