"""Running the job's image on a machine (aws, ssh): one long-lived container per run,
started through the machine's Docker with the GPUs and the run's working directory
mounted at the same path (the provider's bookkeeping files in it read-only); commands
then go through ``docker exec``. Files move through the machine itself (the directory
is shared). On a machine of the run's own (aws) the container uses the host's network
and IPC; on a shared one (ssh) it gets a bridge network with the server's port
published on the host's 127.0.0.1 only, and private IPC.

The login user on such machines is not root (``ubuntu`` on AWS). So the run's
directories are made by the login user before the container starts, the container
runs as the login user's uid:gid (everything it writes into the shared directory can
be uploaded into and removed by that user), and Docker access is checked first: the
user's own (the ``docker`` group), else ``sudo -n docker``, else a clear error.

A machine may have started the pull at boot (``Capabilities.boot_dir``): the image phase
then waits for that pull (its progress read from its log, within the phase's time) and
pulls only when it failed or never ran.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ephemera.errors import ConfigError, PhaseTimeoutError, RemoteCommandError
from ephemera.transport.remote import CommandResult, LineSink, Remote, ShellRemote

RUN_SUBDIRS = ("suite", "artifacts", "logs", "model", "home")

# Prints "docker" or "sudo -n docker" (the first that reaches the engine), then the
# login user's uid:gid; or says why neither works. One round trip.
_PROBE = (
    'if err=$(docker info 2>&1 >/dev/null); then echo "@@docker docker"; '
    'elif sudo -n docker info >/dev/null 2>&1; then echo "@@docker sudo -n docker"; '
    'else echo "@@nodocker $(printf %s "$err" | tail -n 2 | tr -s "[:space:]" " ")"; fi; '
    'echo "@@user $(id -un) $(id -u):$(id -g)"'
)


def prepare_host(host: Remote, workdir: str, where: str = "the instance") -> tuple[str, str]:
    """Make the run's directories as the login user and find how that user reaches
    Docker. Returns (docker command, "uid:gid")."""
    dirs = " ".join(shlex.quote(f"{workdir}/{d}") for d in RUN_SUBDIRS)
    result = host.run(f"mkdir -p {dirs} && {_PROBE}", timeout=60)
    lines = result.output_tail.splitlines()
    docker = next((ln[len("@@docker "):].strip() for ln in lines if ln.startswith("@@docker ")), "")
    user = next((ln.split()[1:] for ln in lines if ln.startswith("@@user ")), [])
    if not result.ok or len(user) != 2:
        raise RemoteCommandError(f"could not prepare the run directory {workdir} on {where}: "
                                 f"{result.output_tail.strip()[-300:]}", exit_status=result.exit_status)
    if not docker:
        why = next((ln[len("@@nodocker "):].strip() for ln in lines if ln.startswith("@@nodocker")), "")
        raise ConfigError(
            f"the login user '{user[0]}' on {where} cannot use Docker ({why or 'docker info failed'}), "
            "and passwordless sudo is not allowed either",
            hint=f"Add the user to the docker group (sudo usermod -aG docker {user[0]}, then log in "
                 "again) or allow it `sudo -n docker`; on AWS the provider's user-data does this.")
    return docker, user[1]


# Seconds a boot task may have been asked for without a pid yet (its unit is starting).
BOOT_START_GRACE = 30


@dataclass
class BootTask:
    """What a task the machine started at boot says in its directory: what it was asked
    for (``want``, one value a line), ``state`` (none: never asked; starting, running,
    done: ``rc`` set; gone: not running and no exit status) and its log's last lines."""

    want: list[str] = field(default_factory=list)
    state: str = "none"
    rc: int | None = None
    log: list[str] = field(default_factory=list)


def _boot_probe(task_dir: str) -> str:
    return (f"d={shlex.quote(task_dir)}; [ -f \"$d/want\" ] || {{ echo '@@state none'; exit 0; }}; "
            """sed 's/^/@@want /' "$d/want"; """
            'if [ -f "$d/rc" ]; then echo "@@state done $(cat "$d/rc")"; '
            'elif p=$(cat "$d/pid" 2>/dev/null) && [ -n "$p" ] && [ -d "/proc/$p" ]; then echo "@@state running"; '
            f'elif [ $(( $(date +%s) - $(stat -c %Y "$d/want") )) -lt {BOOT_START_GRACE} ]; '
            'then echo "@@state starting"; else echo "@@state gone"; fi; '
            """tail -n 40 "$d/log" 2>/dev/null | tr '\\r' '\\n' | tail -n 40; true""")


def read_boot_task(host: Remote, task_dir: str) -> BootTask:
    """The state of the boot task whose files are in ``task_dir`` on the host (one round
    trip); a probe that fails reads as a task never asked for."""
    result = host.run(_boot_probe(task_dir), timeout=30)
    task = BootTask()
    for line in result.output_tail.splitlines() if result.ok else []:
        if line.startswith("@@want"):
            task.want.append(line[len("@@want "):])
        elif line.startswith("@@state "):
            words = line.split()
            task.state = words[1]
            if words[1] == "done":
                task.rc = int(words[2]) if words[2:] and words[2].lstrip("-").isdigit() else -1
        elif line.strip():
            task.log.append(line)
    return task


def wait_boot_task(host: Remote, task_dir: str, deadline: float,
                   waiting: Callable[[BootTask], None]) -> BootTask | None:
    """Read the boot task in ``task_dir`` until it is no longer starting or running
    (``waiting`` is told each reading meanwhile, a second apart); None when
    ``deadline`` (a monotonic time) passes first."""
    task = read_boot_task(host, task_dir)
    while task.state in ("running", "starting"):
        if time.monotonic() > deadline:
            return None
        waiting(task)
        time.sleep(1.0)
        task = read_boot_task(host, task_dir)
    return task


class PullProgress:
    """Reads ``docker pull``'s plain output ("<layer>: Pull complete", ...) into a note of
    the layers done / total for ``progress``."""

    def __init__(self, image: str, progress: Callable[[str], None] | None) -> None:
        self.image = image
        self.progress = progress
        self.layers: dict[str, str] = {}

    def __call__(self, line: str) -> None:
        layer, sep, status = line.strip().partition(": ")
        if not sep or not self.progress or not re.fullmatch(r"[0-9a-f]{6,64}", layer):
            return
        self.layers[layer] = status.strip()
        done = sum(s in ("Pull complete", "Already exists") for s in self.layers.values())
        self.progress(f"pulling {self.image}: {done}/{len(self.layers)} layers")


# The provider's bookkeeping in the run directory (see ephemera_providers._deadman): the
# container sees the directory, but these files only read-only, so nothing the job runs
# can point a teardown at other processes or hide the run from the reaper.
BOOKKEEPING = (".pgids", "labels.json", ".watchdog")


class ContainerRemote(ShellRemote):
    def __init__(self, host: Remote, name: str, workdir: str, run_id: str = "", *,
                 docker: str = "docker", user: str | None = None, network: str = "host",
                 port: int | None = None) -> None:
        self.host = host
        self.name = name
        self.workdir = workdir
        self.run_id = run_id
        self.docker = docker      # "docker" or "sudo -n docker"
        self.user = user          # uid:gid the container runs as (the login user's)
        # "host": the machine's network and IPC (a machine of the run's own); "bridge": a
        # network of its own with the server's port published on the host's 127.0.0.1
        # only, and private IPC (a machine shared with other people's work).
        self.network = network
        self.port = port
        self.read_only: list[str] = []
        self.mounts: list[str] = []   # host directories mounted at the same path (caches)
        self.boot_pull = ""           # what came of a pull started at boot, when there was one

    def isolation_flags(self) -> str:
        """Network, IPC and the read-only bookkeeping mounts of the run's containers."""
        if self.network == "bridge":
            flags = "--network bridge "
            if self.port:
                flags += f"-p 127.0.0.1:{int(self.port)}:{int(self.port)} "
        else:
            flags = "--network host --ipc host "
        return flags + self.bookkeeping_mounts()

    def sibling_flags(self) -> str:
        """For a container beside the run's (the suite image): the same network (the
        server is on its 127.0.0.1) and the same read-only bookkeeping."""
        network = (f"--network container:{self.name} " if self.network == "bridge"
                   else "--network host ")
        return network + self.bookkeeping_mounts()

    def bookkeeping_mounts(self) -> str:
        caches = "".join(f"-v {shlex.quote(f'{d}:{d}')} " for d in self.mounts)
        return caches + "".join(
            f"--mount {shlex.quote(f'type=bind,src={self.workdir}/{f},dst={self.workdir}/{f},readonly')} "
            for f in self.read_only)

    def find_bookkeeping(self) -> None:
        """Which bookkeeping files the provider left in the run directory."""
        listed = self.host.run(
            f"cd {shlex.quote(self.workdir)} && for f in {' '.join(BOOKKEEPING)}; do "
            '[ -f "$f" ] && [ ! -L "$f" ] && echo "@@file $f"; done; true', timeout=60)
        self.read_only = [ln.split()[1] for ln in listed.output_tail.splitlines()
                          if ln.startswith("@@file ") and ln.split()[1:2] and ln.split()[1] in BOOKKEEPING]

    def docker_for(self, env: Mapping[str, str] | None) -> str:
        """The docker command that passes ``env`` on by name (sudo drops the environment
        unless told which names to keep)."""
        if env and self.docker.startswith("sudo"):
            return self.docker.replace("sudo -n", f"sudo -n --preserve-env={','.join(env)}", 1)
        return self.docker

    def user_flags(self) -> str:
        """Run as the login user, with a home in the run directory (images often have
        none for that uid; caches and getpass() need one)."""
        if not self.user or self.user.startswith("0:"):
            return ""
        return (f"--user {shlex.quote(self.user)} -e HOME={shlex.quote(self.workdir + '/home')} "
                "-e USER=ephemera ")

    def start_container(self, image: str, *, gpus: int, expires_at: datetime, shm_size: str = "1g",
                        timeout: float = 900, progress: Callable[[str], None] | None = None,
                        boot_dir: str | None = None) -> None:
        """Start the run's container. Its main process sleeps until the run's expiry and
        ``--rm`` removes it then: a dead-man switch of its own. The image is pulled
        first (when missing; a pull of it started at boot in ``boot_dir`` is waited for
        first) and the sleep is reckoned after the pull, so a slow pull cannot push the
        container's end past the expiry."""
        started = time.monotonic()
        q = shlex.quote(image)
        if boot_dir:
            self.boot_pull = self.join_boot_pull(image, f"{boot_dir}/pull", timeout,
                                                 PullProgress(image, progress))
        pulled = self.host.run(f"{self.docker} image inspect {q} >/dev/null 2>&1 || {self.docker} pull {q}",
                               timeout=timeout, on_line=PullProgress(image, progress))
        if not pulled.ok:
            self._image_error(image, pulled)
        self.find_bookkeeping()
        lifetime = max(1, int((expires_at - datetime.now(UTC)).total_seconds()))
        gpu_flag = "--gpus all " if gpus > 0 else ""
        cmd = (f"{self.docker} rm -f {self.name} >/dev/null 2>&1; "
               f"{self.docker} run -d --rm --name {self.name} {gpu_flag}{self.user_flags()}"
               f"{self.isolation_flags()}--security-opt no-new-privileges "
               f"--shm-size {shm_size} -v {shlex.quote(self.workdir)}:{shlex.quote(self.workdir)} "
               f"--label dev.ephemera.run-id={shlex.quote(self.run_id)} "
               f"--entrypoint sleep {q} {lifetime}")
        result = self.host.run(cmd, timeout=max(30.0, timeout - (time.monotonic() - started)))
        if not result.ok:
            self._image_error(image, result)

    def join_boot_pull(self, image: str, task_dir: str, timeout: float,
                       note: PullProgress) -> str:
        """Wait for the machine's boot pull of ``image`` (its log feeds ``note``) for up to
        ``timeout`` seconds; what came of it, for the run's log ("" when there was none
        of this image)."""
        deadline = time.monotonic() + timeout
        task = read_boot_task(self.host, task_dir)
        if task.state == "none" or task.want[:1] != [image]:
            return ""
        def show(seen: BootTask) -> None:
            for line in seen.log:
                note(line)

        task = wait_boot_task(self.host, task_dir, deadline, show)
        if task is None:
            raise PhaseTimeoutError("image", timeout, f"the pull of {image} started at boot "
                                    f"did not finish within the image phase's {timeout:.0f}s")
        if task.rc == 0:
            return "joined the pull started at boot (done)"
        why = f"exit status {task.rc}" if task.rc is not None else "not running"
        last = task.log[-1].strip()[-200:] if task.log else "no output"
        return f"the pull started at boot failed ({why}: {last}); pulling here"

    @staticmethod
    def _image_error(image: str, result: CommandResult) -> None:
        tail = result.output_tail[-800:]
        if "No such image" in tail or "pull access denied" in tail or "not found" in tail:
            raise ConfigError(f"image '{image}' cannot be run on the instance: {tail.strip()}")
        raise RemoteCommandError(f"could not start the job's image '{image}' on the instance: {tail.strip()}",
                                 exit_status=result.exit_status, output_tail=tail)

    def remove_container(self) -> None:
        self.host.run(f"{self.docker} rm -f {self.name} >/dev/null 2>&1; true", timeout=60)

    def run(self, command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, on_line: LineSink | None = None,
            log_path: Path | None = None) -> CommandResult:
        # Values stay in the host-side environment; docker exec copies them by name.
        names = " ".join(f"-e {k}" for k in (env or {}))
        workdir = f"-w {shlex.quote(cwd)} " if cwd else ""
        outer = f"{self.docker_for(env)} exec {names} {workdir}{self.name} sh -c {shlex.quote(command)}"
        return self.host.run(outer, env=env, timeout=timeout, on_line=on_line, log_path=log_path)

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        self.host.put(local, remote, timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float | None = None,
            within: str | None = None, refused: list[str] | None = None) -> list[Path]:
        return self.host.get(remote, local, timeout=timeout, within=within, refused=refused)

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        # Host networking, or the port published on the host's 127.0.0.1 (bridge).
        return self.host.forward(remote_port, remote_host)

    def close(self) -> None:
        self.host.close()
