"""The ``local`` provider: the job runs as processes on this machine, with no Docker
and no SSH. It is the default when no GPU machine is needed (the built-in CPU
environment runs vLLM from a cached venv).

Each run gets a working directory ``<state_dir>/local/<run-id>`` (under the state
directory rather than /tmp, which other tools may clean, and next to the run's state
file so ``ephemera down`` finds both). Every command the run starts gets its own
session; its process group id is recorded in the directory, so terminate - or the
detached watchdog at the run's expiry, even after ephemera itself was killed - can
end all of them and remove the directory.
"""

from __future__ import annotations

import glob
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
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

from ephemera.errors import ConfigError, InfraError, RemoteCommandError, TeardownError
from ephemera.provider import (
    BuiltinImage,
    Capabilities,
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    OfferRequest,
    PortChoice,
    Runs,
)
from ephemera.sizing.catalog import MAX_COMPUTE_CAPABILITY
from ephemera.spec.settings import get_settings
from ephemera.transport.remote import CommandResult, LineSink, ShellRemote, env_masker, inside

TAIL_LINES = 200

# This machine's environment variables a run's commands get (when set): what a shell,
# Python, torch and vLLM's CPU build need. Anything else (cloud keys, CI tokens, OIDC
# request variables) stays out unless the job sets it or the env_allow setting names it.
BASE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "LANG", "LANGUAGE", "TZ", "TERM",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "LD_LIBRARY_PATH",
})
BASE_ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "VLLM_", "CUDA_", "NCCL_",
                     "TORCH_")


def base_env(environ: Mapping[str, str], allow: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The part of ``environ`` a run's commands may see: BASE_ENV_NAMES, names starting
    with BASE_ENV_PREFIXES, and the names in ``allow``."""
    allowed = set(allow)
    return {k: v for k, v in environ.items()
            if k in BASE_ENV_NAMES or k in allowed or k.startswith(BASE_ENV_PREFIXES)}


class LocalRemote(ShellRemote):
    """Runs commands as local processes; copies are file copies. Relative paths and
    commands without ``cwd`` are taken from the run's working directory.

    With ``run_id`` (default: the name of the working directory when a ``pgid_file`` is
    given) every command gets ``EPHEMERA_RUN_ID`` in its environment: terminate and the
    watchdog only kill a recorded process group whose processes carry it."""

    def __init__(self, workdir: Path | None = None, pgid_file: Path | None = None,
                 run_id: str | None = None) -> None:
        self.workdir = Path(workdir) if workdir else None
        self.pgid_file = pgid_file
        if run_id is None and pgid_file is not None and self.workdir is not None:
            run_id = self.workdir.name
        self.run_env = {"EPHEMERA_RUN_ID": run_id} if run_id else {}

    @staticmethod
    def _base_env() -> dict[str, str]:
        return base_env(os.environ, get_settings().env_allow)

    def _path(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.workdir is not None:
            p = self.workdir / p
        return p

    def _record(self, pgid: int) -> None:
        if self.pgid_file is not None:
            with open(self.pgid_file, "a", encoding="utf-8") as fh:
                fh.write(f"{pgid}\n")

    def run(self, command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, on_line: LineSink | None = None,
            log_path: Path | None = None) -> CommandResult:
        mask = env_masker(env)
        workdir = self._path(cwd) if cwd else self.workdir
        proc = subprocess.Popen(
            ["sh", "-c", command], cwd=workdir,
            env={**self._base_env(), **(env or {}), **self.run_env},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._record(proc.pid)
        lines: queue.Queue[bytes | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        end = time.monotonic() + timeout if timeout else None
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        timed_out = finished = False
        try:
            while True:
                wait = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
                try:
                    raw = lines.get(timeout=wait)
                except queue.Empty:
                    if end is not None and time.monotonic() >= end:
                        timed_out = True
                        break
                    continue
                if raw is None:
                    finished = True
                    break
                line = mask(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                tail.append(line)
                if log:
                    log.write(line + "\n")
                if on_line:
                    on_line(line)
        finally:
            if log:
                log.close()
            if not finished:
                # A timeout, or an exception from on_line. A command that ended normally
                # keeps what it started in the background (its shell may still be
                # exiting: killing the group then would take those with it).
                _killpg(proc.pid)
        if timed_out:
            proc.wait(timeout=10)
            return CommandResult(exit_status=None, output_tail="\n".join(tail), timed_out=True)
        status = proc.wait()
        return CommandResult(exit_status=status, output_tail="\n".join(tail))

    def start(self, command: str, *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, log_file: str) -> str:
        return super().start(command, env=env,
                             cwd=cwd or (str(self.workdir) if self.workdir else None),
                             log_file=str(self._path(log_file)))

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        src, dest = Path(local), self._path(remote)
        if not src.exists():
            raise FileNotFoundError(f"nothing to upload: {src}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)

    def get(self, remote: str, local: Path, *, timeout: float | None = None,
            within: str | None = None, refused: list[str] | None = None) -> list[Path]:
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        refused = refused if refused is not None else []
        root = os.path.realpath(self._path(within)) if within else None
        pattern = str(self._path(remote))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        written: list[Path] = []
        for match in matches:
            src = Path(match)
            if src.is_symlink():
                refused.append(f"{src} is a symbolic link (to {os.path.realpath(src)}): not followed")
                continue
            if root is not None and not inside(os.path.realpath(src), root):
                refused.append(f"{src} is outside the run directory {within}: not copied")
                continue
            dest = local / src.name
            if src.is_dir():
                written += _copy_tree(src, dest, refused)
            elif src.is_file():
                shutil.copyfile(src, dest)
                written.append(dest)
        return written

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        if remote_host not in ("127.0.0.1", "localhost", "::1"):
            raise InfraError(f"the local provider cannot forward to {remote_host}")
        return remote_port

    def close(self) -> None:
        return None


def _copy_tree(src: Path, dest: Path, refused: list[str]) -> list[Path]:
    """Plain files and directories below ``src``; symbolic links are left out (and named
    in ``refused``), never followed."""
    written: list[Path] = []
    dest.mkdir(parents=True, exist_ok=True)
    with os.scandir(src) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_symlink():
                refused.append(f"{path} is a symbolic link: not followed")
            elif entry.is_dir(follow_symlinks=False):
                written += _copy_tree(path, dest / entry.name, refused)
            elif entry.is_file(follow_symlinks=False):
                shutil.copyfile(path, dest / entry.name)
                written.append(dest / entry.name)
    return written


def _killpg(pgid: int) -> None:
    """Kill the group of a child this process started and has not reaped yet (so its
    pid cannot have been recycled). Never 0 or 1, nor anything below."""
    if pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _meminfo_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


# nvidia-smi's GPU list: name, total MiB and compute capability, one GPU a line. Drivers
# older than the compute_cap field refuse the whole query: ask again without it.
NVIDIA_SMI_FIELDS = "name,memory.total,compute_cap"
NVIDIA_SMI_FIELDS_OLD = "name,memory.total"
NVIDIA_SMI_SHELL = (
    f"nvidia-smi --query-gpu={NVIDIA_SMI_FIELDS} --format=csv,noheader,nounits 2>/dev/null || "
    f"nvidia-smi --query-gpu={NVIDIA_SMI_FIELDS_OLD} --format=csv,noheader,nounits 2>/dev/null || true")


def query_nvidia_smi(timeout: float = 30) -> str:
    """This machine's ``nvidia-smi`` GPU list (see NVIDIA_SMI_FIELDS); '' without one."""
    if not shutil.which("nvidia-smi"):
        return ""
    for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS_OLD):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        if out.returncode == 0:
            return out.stdout
    return ""


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_nvidia_smi(text: str) -> list[tuple[str, float, float | None]]:
    """(name, total GiB, compute capability or None) per GPU line of nvidia-smi's CSV.
    Lines that do not describe a GPU (no name, no positive memory: "[N/A]", a MIG
    instance, a warning) are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        mib = _finite(parts[1]) if len(parts) >= 2 else None
        if not parts[0] or mib is None or mib < 10.24:  # under 0.01 GiB: not a GPU's memory
            continue
        cap = _finite(parts[2]) if len(parts) >= 3 else None
        usable = cap is not None and 1 <= cap < MAX_COMPUTE_CAPABILITY
        gpus.append((parts[0], mib / 1024, cap if usable else None))
    return gpus


def nvidia_offers(provider: str, instance_type: str, text: str, vcpus: int,
                  memory_gib: float) -> list[Offer]:
    """Offers from ``nvidia-smi --query-gpu=name,memory.total[,compute_cap]
    --format=csv,noheader,nounits`` output: one offer for all GPUs of the first model
    (a machine is taken whole), with the smallest memory and capability among them."""
    gpus = parse_nvidia_smi(text)
    if not gpus:
        return []
    name = gpus[0][0]
    same = [g for g in gpus if g[0] == name]
    caps = [g[2] for g in same if g[2] is not None]
    return [Offer(provider=provider, instance_type=instance_type, region=None, gpu=name,
                  gpu_count=len(same), gpu_memory_gib=round(min(g[1] for g in same), 2),
                  vcpus=vcpus, memory_gib=memory_gib, price_per_hour=0.0,
                  price_source="nvidia-smi", compute_capability=min(caps) if caps else None)]


class LocalProvider:
    """Processes on this machine. See the module docstring."""

    name: ClassVar[str] = "local"

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        """Processes on this machine, shared with other runs: a free port here."""
        return Capabilities(runs=Runs.THIS_MACHINE, port=PortChoice.FREE_HERE,
                            builtin_image=BuiltinImage.CPU_ENV)

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else get_settings().state_dir / "local"

    @classmethod
    def check(cls) -> tuple[bool, str]:
        return True, "runs jobs as processes on this machine"

    def describe(self) -> str:
        return f"processes on this machine (work dirs in {self.root})"

    # -- offers

    def offers(self, request: OfferRequest) -> list[Offer]:
        vcpus, mem = os.cpu_count() or 1, _meminfo_gib()
        found = nvidia_offers(self.name, "local-gpu", query_nvidia_smi(), vcpus, mem)
        if found:
            return found
        return [Offer(provider=self.name, instance_type="local-cpu", region=None, gpu=None,
                      gpu_count=0, gpu_memory_gib=0.0, vcpus=vcpus, memory_gib=mem,
                      price_per_hour=0.0, price_source="this machine")]

    # -- lifecycle

    def _workdir(self, run_id: str) -> Path:
        return self.root / check_run_id(run_id)

    def _instance(self, record: dict, workdir: Path) -> Instance:
        return Instance(
            provider=self.name, id=record["id"], run_id=record["run_id"],
            state=InstanceState.READY, labels=unprefixed(record.get("labels", {})),
            instance_type=record.get("instance_type", "local-cpu"), workdir=str(workdir),
            launched_at=datetime.fromisoformat(record["launched_at"]) if record.get("launched_at") else None,
            data={"workdir": str(workdir), "watchdog_pid": str(record.get("watchdog_pid", ""))},
        )

    def _read(self, workdir: Path) -> dict | None:
        """The run's labels.json; None when missing or not one (never an exception: a
        damaged directory must not stop ``find`` from listing the other runs)."""
        try:
            record = json.loads((workdir / "labels.json").read_text())
            ok = (isinstance(record, dict)
                  and all(isinstance(record.get(k), str) for k in ("id", "run_id"))
                  and isinstance(record.get("labels", {}), dict)
                  and all(isinstance(v, str) for v in record.get("labels", {}).values())
                  and isinstance(record.get("instance_type", ""), str))
            if ok and record.get("launched_at"):
                datetime.fromisoformat(record["launched_at"])
        except (OSError, ValueError, TypeError, RecursionError):
            return None
        return record if ok else None

    def launch(self, spec: LaunchSpec) -> Instance:
        workdir = self._workdir(spec.run_id)
        existing = self._read(workdir)
        if existing is not None:
            return self._instance(existing, workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / ".pgids").touch()
        out = subprocess.run(
            ["sh", "-c", start_watchdog_command(str(workdir), int(spec.expires_at.timestamp()),
                                                spec.run_id)],
            capture_output=True, text=True, timeout=30, start_new_session=True)
        pid = out.stdout.strip()
        if out.returncode != 0 or not pid.isdigit():
            shutil.rmtree(workdir, ignore_errors=True)
            raise InfraError(f"could not start the dead-man watchdog for {spec.run_id}: {out.stderr}")
        record = {
            "id": f"local-{spec.run_id}", "run_id": spec.run_id,
            "labels": prefixed(dict(spec.labels)), "instance_type": spec.offer.instance_type,
            "launched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "expires_at": spec.expires_at.astimezone(UTC).isoformat(timespec="seconds"),
            "watchdog_pid": int(pid),
        }
        tmp = workdir / "labels.json.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(workdir / "labels.json")
        return self._instance(record, workdir)

    def poll(self, instance: Instance) -> Instance:
        workdir = Path(instance.data.get("workdir") or self._workdir(instance.run_id))
        if self._read(workdir) is None:
            return instance.evolve(state=InstanceState.TERMINATED, endpoint=None)
        return instance.evolve(state=InstanceState.READY, workdir=str(workdir))

    def terminate(self, instance: Instance) -> None:
        expected = self._workdir(instance.run_id)
        workdir = instance.data.get("workdir") or str(expected)
        if Path(workdir).resolve() != expected.resolve():
            # A state file is input: never remove a directory this provider did not make.
            raise ConfigError(f"the recorded working directory {workdir} of run "
                              f"{instance.run_id} is not {expected}: not touching it")
        result = subprocess.run(["sh", "-c", cleanup_script(workdir, instance.run_id)],
                                capture_output=True,
                                text=True, timeout=60)
        if result.returncode != 0 or Path(workdir).exists():
            raise TeardownError(f"could not remove the local run directory {workdir}: "
                                f"{result.stderr.strip() or 'still present'}")

    def find(self, labels: Mapping[str, str]) -> list[Instance]:
        found = []
        if not self.root.is_dir():
            return found
        for workdir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            record = self._read(workdir)
            if record is None:
                continue
            have = unprefixed(record.get("labels", {}))
            if all(have.get(k) == v for k, v in labels.items()):
                found.append(self._instance(record, workdir))
        return found

    def connect(self, instance: Instance) -> LocalRemote:
        workdir = Path(instance.data.get("workdir") or self._workdir(instance.run_id))
        if not workdir.is_dir():
            raise RemoteCommandError(f"the local run directory {workdir} does not exist "
                                     "(terminated or expired)")
        return LocalRemote(workdir, workdir / ".pgids", run_id=instance.run_id)
