"""The ``ssh`` provider: run jobs on a machine that already exists (an on-prem GPU box).

The target comes from the job's ``resources.ssh`` section (host, port, user, key,
workroot, gpus) or from the settings ``EPHEMERA_SSH_HOST/PORT/USER/KEY/WORKROOT``.
"Launching" makes an isolated working directory ``<workroot>/<run-id>`` (mode 0700) on the host
with a ``labels.json`` (so ``find`` and the reaper see it) and starts a detached
watchdog there that ends the run at its expiry even if ephemera dies. Terminate kills
every process group the run started (they are recorded in the directory), stops the
watchdog and removes the directory; nothing else on the host is touched.

The default work root ``~/ephemera-runs`` is resolved on the host (the login user's
home), made with mode 0700 when missing, and refused when it is a symbolic link, is
owned by another user or is writable by group or others. An absolute work root is used
as given; the run directory itself gets the same check either way.

``Instance.data`` carries the target and the pinned host key as plain strings, so
another process (``ephemera down``) can terminate the run from the state file.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shlex
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from ephemera_providers._deadman import (
    check_run_id,
    cleanup_script,
    prefixed,
    start_watchdog_command,
    unprefixed,
)
from ephemera_providers.local import NVIDIA_SMI_SHELL, nvidia_offers

from ephemera.errors import ConfigError, EphemeraError, InfraError, TeardownError
from ephemera.lifecycle.state import write_json_atomic
from ephemera.provider import (
    LABEL_RUN_ID,
    Capabilities,
    Endpoint,
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    OfferRequest,
    PortChoice,
    Runs,
)
from ephemera.spec.settings import get_settings
from ephemera.transport.ssh import HostKeyPin, Target
from ephemera.transport.ssh_remote import SSHRemote

log = logging.getLogger(__name__)

_TARGET_KEYS = ("host", "port", "user", "key", "workroot")

CONNECT_TIMEOUT = 30.0   # launch/terminate: the host exists, so it should answer soon
POLL_TIMEOUT = 10.0      # poll must not hold the controller long

HOME_PREFIX = "~/"
# Stands for the work root in the watchdog's text until the host has resolved "~/".
ROOT_PLACEHOLDER = "/@@ephemera-workroot@@"

# Shell functions of the launch script: refuse a directory that another user could
# change (a symbolic link, owned by someone else, writable by group or others).
_CHECK_DIR = (
    '_refuse() { echo "ephemera: refusing the work directory $1: $2" >&2; exit 3; }; '
    '_check() { [ -L "$1" ] && _refuse "$1" "it is a symbolic link"; '
    '[ -d "$1" ] || _refuse "$1" "it is not a directory"; '
    'set -- "$1" $(stat -c "%u %a" "$1"); '
    '[ "$2" = "$(id -u)" ] || _refuse "$1" "it is owned by uid $2, not by the login user '
    '$(id -un) (uid $(id -u))"; '
    '[ $(( 0$3 & 022 )) -eq 0 ] || _refuse "$1" "its mode $3 lets group or others write '
    'to it (chmod go-w it)"; }; '
)


def in_home(workroot: str) -> bool:
    return workroot.startswith(HOME_PREFIX)


def root_word(workroot: str) -> str:
    """The work root as one shell word; ``~/x`` is ``x`` in the login user's home."""
    if in_home(workroot):
        return '"$HOME"/' + shlex.quote(workroot[len(HOME_PREFIX):].strip("/"))
    return shlex.quote(workroot)


def home_workroot(workroot: str, user: str) -> str:
    """``workroot`` with ``~/`` taken as the home of ``user`` on a standard cloud image
    (/root, else /home/<user>), for hosts this process cannot ask first."""
    if not in_home(workroot):
        return workroot
    home = "/root" if user == "root" else f"/home/{user}"
    return posixpath.join(home, workroot[len(HOME_PREFIX):].strip("/"))


def _target_fields(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``resources.ssh`` section, whether passed as the options themselves or
    nested under an ``ssh`` key."""
    if not options:
        return {}
    if "ssh" in options and isinstance(options["ssh"], Mapping):
        return dict(options["ssh"])
    return dict(options) if "host" in options else {}


class SSHProvider:
    """Jobs in a working directory on an existing host. See the module docstring."""

    name: ClassVar[str] = "ssh"

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        """An existing host shared with other people's work: a free port asked on the
        host, and the job's container on a bridge network unless the job asks for the
        host's (``resources.ssh.network``)."""
        network = (_target_fields(options) or {}).get("network") or "bridge"
        return Capabilities(runs=Runs.MACHINE, port=PortChoice.FREE_ON_MACHINE,
                            container_network=str(network))

    def __init__(self, target: Mapping[str, Any] | None = None) -> None:
        self.default = dict(target or {})

    @classmethod
    def check(cls) -> tuple[bool, str]:
        settings = get_settings()
        if not settings.ssh_host:
            return True, "needs resources.ssh in the job or EPHEMERA_SSH_HOST"
        fields = cls()._resolve(None)
        where = f"{fields['user']}@{fields['host']}:{fields['port']}"
        remote = SSHRemote(cls()._target(fields), pin=HostKeyPin(settings.ssh_host_key),
                           connect_timeout=10, op_timeout=10)
        try:
            result = remote.run("nvidia-smi -L 2>/dev/null | wc -l", timeout=15)
        except EphemeraError as exc:
            return False, f"default host {where}: {exc.message}"
        finally:
            remote.close()
        pinned = "pinned host key" if settings.ssh_host_key else "host key from known_hosts"
        gpus = result.output_tail.strip().splitlines()[-1:] if result.ok else []
        count = gpus[0] if gpus and gpus[0].isdigit() else "?"
        return True, f"default host {where}: sshd answers, key accepted ({pinned}); {count} GPU(s)"

    def describe(self) -> str:
        t = self._resolve(None)
        return f"an existing host over SSH ({t['user']}@{t['host']}:{t['port']})" if t.get("host") \
            else "an existing host over SSH (none configured)"

    # -- target

    def _resolve(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        settings = get_settings()
        fields = _target_fields(options) or dict(self.default)
        host = fields.get("host") or settings.ssh_host
        key = fields.get("key") or (str(settings.ssh_key) if settings.ssh_key else None)
        return {
            "host": host,
            "port": int(fields.get("port") or settings.ssh_port),
            "user": fields.get("user") or settings.ssh_user,
            "key": str(key) if key else None,
            "workroot": fields.get("workroot") or settings.ssh_workroot,
            "gpus": fields.get("gpus"),
            "host_key": fields.get("host_key") or (
                settings.ssh_host_key if host == settings.ssh_host else None),
        }

    def _target(self, fields: Mapping[str, Any]) -> Target:
        if not fields.get("host"):
            raise ConfigError("the ssh provider needs a host: set resources.ssh.host in the job "
                              "or EPHEMERA_SSH_HOST.")
        workroot = str(fields["workroot"])
        below = workroot[len(HOME_PREFIX):] if in_home(workroot) else workroot
        if (not (in_home(workroot) or workroot.startswith("/")) or below.strip("/") == ""
                or "\n" in workroot):
            raise ConfigError(f"resources.ssh.workroot must be an absolute directory below / "
                              f"or one below the login user's home ('~/name'), not '{workroot}'")
        return Target(host=fields["host"], port=int(fields["port"]), user=fields["user"],
                      key_path=fields.get("key"))

    def _from_instance(self, instance: Instance) -> dict[str, Any]:
        data = instance.data
        if data.get("host"):
            return {"host": data["host"], "port": int(data.get("port") or 22),
                    "user": data.get("user") or "root", "key": data.get("key") or None,
                    "workroot": data.get("workroot") or posixpath.dirname(data.get("workdir", "")),
                    "host_key": data.get("host_key") or None}
        return self._resolve(None)

    def _remote(self, fields: Mapping[str, Any], timeout: float,
                pin: str | None = None) -> SSHRemote:
        return SSHRemote(self._target(fields), pin=HostKeyPin(pin), connect_timeout=timeout,
                         op_timeout=timeout)

    # -- offers

    def offers(self, request: OfferRequest) -> list[Offer]:
        fields = self._resolve(request.options or None)
        instance_type = f"ssh:{fields.get('host')}"
        declared = fields.get("gpus")
        if declared:
            return [self._declared_offer(declared, instance_type)]
        remote = self._remote(fields, CONNECT_TIMEOUT, fields.get("host_key"))
        try:
            result = remote.run(
                "nproc; awk '/^MemTotal:/ {print $2}' /proc/meminfo; echo @@gpus; "
                + NVIDIA_SMI_SHELL, timeout=60)
        finally:
            remote.close()
        if not result.ok:
            raise InfraError(f"could not describe {fields['host']}: {result.output_tail[-300:]}")
        head, _, gpu_text = result.output_tail.partition("@@gpus")
        nums = head.split()
        vcpus = int(nums[0]) if nums and nums[0].isdigit() else 1
        mem = round(int(nums[1]) / 1024 / 1024, 1) if len(nums) > 1 and nums[1].isdigit() else 0.0
        found = nvidia_offers(self.name, instance_type, gpu_text, vcpus, mem)
        return found or [Offer(provider=self.name, instance_type=instance_type, region=None,
                               gpu=None, gpu_count=0, gpu_memory_gib=0.0, vcpus=vcpus,
                               memory_gib=mem, price_per_hour=0.0, price_source="declared host")]

    def _declared_offer(self, gpus: list[dict[str, Any]], instance_type: str) -> Offer:
        try:
            first = gpus[0]
            name = str(first["name"])
            memory = float(first.get("memory_gib") or first["memory_mib"] / 1024)
            count = sum(int(g.get("count", 1)) for g in gpus)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(
                "resources.ssh.gpus: each entry needs 'name' and 'memory_gib' (or 'memory_mib'), "
                f"optionally 'count' ({exc!r})") from None
        return Offer(provider=self.name, instance_type=instance_type, region=None, gpu=name,
                     gpu_count=count, gpu_memory_gib=memory, vcpus=0, memory_gib=0.0,
                     price_per_hour=0.0, price_source="declared in resources.ssh.gpus")

    # -- lifecycle

    def _instance(self, fields: Mapping[str, Any], record: Mapping[str, Any], workdir: str,
                  host_key: str | None) -> Instance:
        endpoint = Endpoint(host=fields["host"], port=int(fields["port"]), user=fields["user"],
                            key_path=fields.get("key"), host_key=host_key)
        launched = record.get("launched_at")
        return Instance(
            provider=self.name, id=record["id"], run_id=record["run_id"],
            state=InstanceState.READY, labels=unprefixed(dict(record.get("labels", {}))),
            instance_type=f"ssh:{fields['host']}", endpoint=endpoint, workdir=workdir,
            launched_at=datetime.fromisoformat(launched) if launched else None,
            data={"host": str(fields["host"]), "port": str(fields["port"]),
                  "user": str(fields["user"]), "key": str(fields.get("key") or ""),
                  "workroot": posixpath.dirname(workdir), "workdir": workdir,
                  "host_key": host_key or ""},
        )

    def launch(self, spec: LaunchSpec) -> Instance:
        run_id = check_run_id(spec.run_id)
        fields = self._resolve(spec.options)
        self._target(fields)
        workroot = str(fields["workroot"])
        shown = posixpath.join(workroot, run_id)
        self._record_target(run_id, fields, spec.expires_at)
        record = {
            "id": f"ssh-{fields['host']}-{fields['port']}-{run_id}", "run_id": run_id,
            "labels": prefixed(dict(spec.labels)),
            "launched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "expires_at": spec.expires_at.astimezone(UTC).isoformat(timespec="seconds"),
        }
        script = _launch_script(workroot, run_id, int(spec.expires_at.timestamp()), record)
        remote = self._remote(fields, CONNECT_TIMEOUT, fields.get("host_key"))
        try:
            result = remote.run(script, timeout=60)
        finally:
            remote.close()
        if not result.ok:
            raise InfraError(f"could not prepare {shown} on {fields['host']}: "
                             f"{result.output_tail[-500:]}")
        lines = result.output_tail.strip().splitlines()
        workdir = _resolved_workdir(lines, run_id) if in_home(workroot) else shown
        try:
            stored = json.loads(lines[-1])
        except (ValueError, IndexError):
            raise InfraError(f"unreadable labels.json in {workdir} on {fields['host']}: "
                             f"{result.output_tail[-300:]}") from None
        return self._instance(fields, stored, workdir, remote.pin.line)

    def poll(self, instance: Instance) -> Instance:
        fields = self._from_instance(instance)
        workdir = instance.data.get("workdir") or posixpath.join(str(fields["workroot"]),
                                                                  check_run_id(instance.run_id))
        remote = self._remote(fields, POLL_TIMEOUT, fields.get("host_key"))
        try:
            result = remote.run(f"test -f {shlex.quote(workdir)}/labels.json && echo present "
                                "|| echo absent", timeout=POLL_TIMEOUT)
        except EphemeraError as exc:
            return instance.evolve(message=f"host not answering: {exc}")
        finally:
            remote.close()
        if result.output_tail.strip().endswith("absent"):
            return instance.evolve(state=InstanceState.TERMINATED)
        if not result.ok:
            return instance.evolve(message=f"poll failed: {result.output_tail[-200:]}")
        return instance.evolve(state=InstanceState.READY, workdir=workdir, message="")

    def terminate(self, instance: Instance) -> None:
        fields = self._from_instance(instance)
        if instance.data.get("workdir"):
            workdir = instance.data["workdir"]
        else:
            workdir = posixpath.join(str(fields["workroot"]), check_run_id(instance.run_id))
        remote = self._remote(fields, CONNECT_TIMEOUT, fields.get("host_key"))
        try:
            # A run that used a container image left one on the host's Docker (labelled with
            # the run id by ephemera.transport.container): remove it first, when Docker is there.
            run_label = shlex.quote(f"label=dev.ephemera.run-id={check_run_id(instance.run_id)}")
            containers = (f"if command -v docker >/dev/null 2>&1; then docker ps -aq --filter {run_label} "
                          "| xargs -r docker rm -f >/dev/null 2>&1; fi; ")
            q = shlex.quote(workdir)
            ended = f"{q}/.ephemera-ended"   # marks a run ended with files it could not remove
            result = remote.run(f"[ -e {ended} ] && exit 0; " + containers + cleanup_script(workdir),
                                timeout=90)
            if not result.ok:
                # The run's processes were killed before the removal; what is left are files
                # the login user may not delete (written by root). labels.json gone means the
                # run is over: say so once, and do not hold the teardown retrying.
                check = remote.run(f"test -e {q}/labels.json && echo labels-left || "
                                   f"{{ : > {ended}; echo run-ended; }}", timeout=30)
                if check.ok and check.output_tail.strip().endswith("run-ended"):
                    log.warning("run %s ended on %s, but %s could not be removed completely "
                                "(files the login user may not delete): %s", instance.run_id,
                                fields["host"], workdir, result.output_tail.strip()[-300:])
                    return
        except EphemeraError as exc:
            raise TeardownError(f"could not reach {fields['host']} to remove {workdir}: {exc}",
                                hint="Its watchdog still ends the run at expires-at.") from None
        finally:
            remote.close()
        if not result.ok:
            raise TeardownError(f"could not remove {workdir} on {fields['host']}: "
                                f"{result.output_tail[-300:]}")

    # -- where runs were launched (so another process finds them)

    @staticmethod
    def _records_dir() -> Path:
        return get_settings().state_dir / "ssh-targets"

    def _record_target(self, run_id: str, fields: Mapping[str, Any], expires_at: datetime) -> None:
        """Write down the host a run is launched on before anything is made there: the job
        names the host, so ``down`` and ``reap`` in another process (without the job)
        could not find the run otherwise. A run that cannot be recorded is not launched."""
        record = {"run_id": run_id, "expires_at": expires_at.astimezone(UTC).isoformat(),
                  **{k: fields.get(k) for k in _TARGET_KEYS}}
        directory = self._records_dir()
        try:
            write_json_atomic(directory / f"{run_id}.json", record)
        except OSError as exc:
            raise InfraError(f"could not record where run {run_id} is launched ({directory}): {exc}; "
                             "not launching what a later `ephemera down` could not find") from None

    def _targets(self, run_id: str | None) -> list[dict[str, Any]]:
        """The default host plus the recorded ones (of ``run_id``, or of every run whose
        expiry is less than a day past), each once."""
        targets = []
        default = self._resolve(None)
        if default.get("host"):
            targets.append(default)
        directory = self._records_dir()
        paths = [directory / f"{run_id}.json"] if run_id else sorted(directory.glob("*.json"))
        now = datetime.now(UTC)
        for path in paths:
            try:
                record = json.loads(path.read_text())
                if not run_id and (now - datetime.fromisoformat(record["expires_at"])).days >= 1:
                    path.unlink(missing_ok=True)
                    continue
                fields = {k: record[k] for k in _TARGET_KEYS}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            targets.append(fields)
        unique: dict[tuple, dict[str, Any]] = {}
        for fields in targets:
            unique.setdefault(tuple(str(fields.get(k)) for k in ("host", "port", "user", "workroot")), fields)
        return list(unique.values())

    def find(self, labels: Mapping[str, str]) -> list[Instance]:
        """Runs with these labels on the default host and on every host a run was
        recorded on. A host that cannot be searched makes the search fail: a teardown
        must not report "nothing left" without having looked."""
        found: list[Instance] = []
        for fields in self._targets(labels.get(LABEL_RUN_ID)):
            found += self._find_on(fields, labels)
        return found

    def _find_on(self, fields: Mapping[str, Any], labels: Mapping[str, str]) -> list[Instance]:
        root = root_word(str(fields["workroot"]))
        remote = self._remote(fields, CONNECT_TIMEOUT)
        lines: list[str] = []
        try:
            result = remote.run(
                f"for f in {root}/*/labels.json; do [ -f \"$f\" ] && "
                "printf '%s\\t' \"$(dirname \"$f\")\" && head -n 1 \"$f\"; done; true",
                timeout=60, on_line=lines.append)
        finally:
            remote.close()
        if not result.ok:
            raise InfraError(f"could not list runs on {fields['host']}: {result.output_tail[-300:]}")
        found = []
        for line in lines:
            workdir, _, raw = line.partition("\t")
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            have = unprefixed(dict(record.get("labels", {})))
            if all(have.get(k) == v for k, v in labels.items()):
                found.append(self._instance(fields, record, workdir, remote.pin.line))
        return found

    def connect(self, instance: Instance) -> SSHRemote:
        fields = self._from_instance(instance)
        workdir = instance.data.get("workdir") or instance.workdir
        remote = SSHRemote(self._target(fields), pin=HostKeyPin(fields.get("host_key")),
                           pgid_file=posixpath.join(workdir, ".pgids") if workdir else None,
                           run_id=instance.run_id)
        return remote


def _launch_script(workroot: str, run_id: str, expires_epoch: int, record: Mapping) -> str:
    """One shell script (one round trip): resolve and check the work root, reuse the
    directory of an earlier launch of the same run, or create it (mode 0700), start the
    watchdog and write labels.json last (it marks "ready"). Prints ``@@workdir <path>``
    and then the run's labels.json line."""
    if in_home(workroot):
        # The path is known on the host only: the watchdog's text gets it there.
        template = start_watchdog_command(f"{ROOT_PLACEHOLDER}/{run_id}", expires_epoch)
        watchdog = (f'eval "$(printf \'%s\' {shlex.quote(template)} '
                    f'| sed "s#{ROOT_PLACEHOLDER}#$root#g")"')
        root = (f"root={root_word(workroot)}; "
                'case "$root" in /?*) ;; *) _refuse "$root" "the login user\'s home is not '
                'an absolute path";; esac; '
                f'case "$root/{run_id}" in *[!A-Za-z0-9/._-]*) _refuse "$root" "unusual '
                'characters in the path (set an absolute workroot)";; esac; '
                '{ [ -e "$root" ] || [ -L "$root" ] || mkdir -p -m 700 "$root"; } || exit 3; '
                '_check "$root"; ')
    else:
        watchdog = start_watchdog_command(posixpath.join(workroot, run_id), expires_epoch)
        root = f'root={shlex.quote(workroot)}; mkdir -p "$root" || exit 3; '
    return (
        _CHECK_DIR + root + f'w="${{root%/}}"/{run_id}; '
        'if [ -e "$w" ] || [ -L "$w" ]; then _check "$w"; fi; '
        'echo "@@workdir $w"; '
        'if [ -f "$w/labels.json" ]; then cat "$w/labels.json"; exit 0; fi; '
        '{ [ -d "$w" ] || mkdir -m 700 "$w"; } && : > "$w/.pgids" && '
        f"{{ {watchdog}; }} && "
        f'printf \'%s\\n\' {shlex.quote(json.dumps(record))} > "$w/labels.json.tmp" && '
        'mv "$w/labels.json.tmp" "$w/labels.json" && cat "$w/labels.json"'
    )


def _resolved_workdir(lines: list[str], run_id: str) -> str:
    """The run directory the launch script resolved on the host (its ``@@workdir`` line)."""
    found = [line[len("@@workdir "):] for line in lines if line.startswith("@@workdir ")]
    workdir = posixpath.normpath(found[-1]) if found else ""
    if not workdir.startswith("/") or posixpath.basename(workdir) != run_id:
        raise InfraError(f"the host did not report a usable run directory for {run_id}: "
                         f"{chr(10).join(lines)[-300:]}")
    return workdir
