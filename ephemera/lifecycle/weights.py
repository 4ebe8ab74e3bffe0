"""The weights phase: a hub model's files downloaded into a Hugging Face cache directory
on the machine's host while the image is pulled, then mounted into the job's container
(``HF_HOME``) so vLLM loads them from there.

Where it runs: the docker provider on this machine's engine (the host is this machine:
the download runs here, in a thread, beside the pull) and providers whose machine runs
the image through its own Docker (ssh, aws, slurm: a detached process on the host,
started over the run's channel before the image phase, so a gated model's token reaches
the machine only over SSH). Where the provider does boot work (``Capabilities.boot_dir``)
and the model needs no token, the machine starts the same download at boot
(``boot_request`` travels in the launch options); the weights phase then finds it (same
repo, revision and cache), waits for its exit status and snapshot mark, and downloads
itself only when the boot download failed or never ran. huggingface_hub does the download: 1.x and later through
hf_xet (``HF_XET_HIGH_PERFORMANCE``), 0.x through hf_transfer when it is installed.

The cache directory: ``cache.weights`` (or the setting) names one that outlives the
run; without it the download goes to a directory of the run's own, removed with it.
An ``s3://`` location is restored into the 'auto' place before the download and saved
back at the end (``cache_store``). A download that fails costs time only: vLLM then
downloads the model itself.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ephemera.lifecycle import cache_store
from ephemera.lifecycle.records import PhaseRecord
from ephemera.provider import Runs
from ephemera.transport.container import BootTask, read_boot_task, wait_boot_task
from ephemera.transport.remote import inside

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run
    from ephemera.transport.remote import Remote

HUB_MOUNT = "/ephemera-cache/hf"   # HF_HOME inside a docker provider's container
DONE_MARK = "@@snapshot "

# The same download as `download` below, for a host's own Python (argv: repo, revision,
# cache dir; HF_TOKEN and HF_ENDPOINT from the environment).
HOST_SCRIPT = r"""
import importlib.util, os, sys
import huggingface_hub as hub
from huggingface_hub import constants
if int(hub.__version__.split(".")[0]) >= 1:
    os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
elif importlib.util.find_spec("hf_transfer"):
    constants.HF_HUB_ENABLE_HF_TRANSFER = True
repo, revision, cache = sys.argv[1], sys.argv[2] or None, sys.argv[3]
path = hub.snapshot_download(repo, revision=revision, cache_dir=cache,
                             token=os.environ.get("HF_TOKEN") or None)
print("@@snapshot " + path, flush=True)
"""


def download(repo_id: str, revision: str | None, cache_dir: Path, *, token: str | None,
             endpoint: str | None) -> str:
    """Download ``repo_id`` at ``revision`` into the hub cache ``cache_dir``; the snapshot
    directory (``.../snapshots/<commit>``: a path fixed by the model and its revision)."""
    import importlib.util

    import huggingface_hub as hub
    from huggingface_hub import constants

    if int(hub.__version__.split(".")[0]) >= 1:
        os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")   # hf_xet; hf_transfer only warns
    elif importlib.util.find_spec("hf_transfer"):
        constants.HF_HUB_ENABLE_HF_TRANSFER = True
    return hub.snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir),
                                 token=token or None, endpoint=endpoint or None)


@dataclass
class WeightsJob:
    """One download under way: where its cache is on the host and in the container."""

    repo_id: str
    revision: str | None
    host_home: str                      # HF_HOME on the host
    container_home: str                 # HF_HOME where the server runs
    record: PhaseRecord
    owned: bool                         # a directory of the run's own (removed with it)
    thread: threading.Thread | None = None
    handle: str | None = None           # the host process (machine providers)
    boot: bool = False                  # joined the download the machine started at boot
    result: dict[str, str] = field(default_factory=dict)

    def container_path(self, snapshot: str) -> str:
        return self.container_home + snapshot[len(self.host_home):]


def _location(run: Run) -> str | None:
    return cache_store.configured(run, "weights")


def _env_value(run: Run, name: str) -> str | None:
    return run.job.server.env.get(name) or run.job.env.get(name) or os.environ.get(name)


def _open_record(run: Run, detail: str) -> PhaseRecord:
    """The weights phase runs beside others: its record is opened here, closed by finish."""
    record = PhaseRecord(name="weights", started_at=datetime.now(UTC))
    run.phases.append(record)
    run._log(f"> weights: {detail} (beside the image pull)")
    return record


def start_local(run: Run, hub_id: str) -> WeightsJob | None:
    """Docker on this machine's engine: download here, in a thread, into a directory that
    the container gets mounted as its HF_HOME."""
    if not hub_id or run.caps.runs is not Runs.IMAGE or run.caps.builtin_image.value != "local-engine":
        return None
    location = _location(run)
    owned = location is None
    base = Path(location).expanduser() if location and location != "auto" else run.settings.cache_dir / "hf"
    home = (run.settings.cache_dir / "hf-runs" / run.run_id) if owned else base
    home.mkdir(parents=True, exist_ok=True)
    job = WeightsJob(hub_id, run.job.model.revision, str(home.resolve()), HUB_MOUNT,
                     _open_record(run, f"{hub_id} into {home}"), owned)
    token, endpoint = _env_value(run, "HF_TOKEN"), _env_value(run, "HF_ENDPOINT")

    def work() -> None:
        try:
            job.result["snapshot"] = download(hub_id, job.revision, Path(job.host_home) / "hub",
                                              token=token, endpoint=endpoint)
        except Exception as exc:  # noqa: BLE001 - reported by finish; vLLM downloads instead
            job.result["error"] = f"{type(exc).__name__}: {exc}"

    job.thread = threading.Thread(target=work, name="weights", daemon=True)
    job.thread.start()
    run.weights = job
    return job


def docker_mounts(run: Run) -> list[str]:
    """The docker provider's bind mount of the hub cache (``src:dst:rw``)."""
    job = getattr(run, "weights", None)
    return [f"{job.host_home}:{job.container_home}:rw"] if job is not None else []


def hub_venv(home: str, owned: bool) -> str:
    """Where a host without huggingface_hub gets a virtualenv with it: inside a cache of
    the run's own, beside a lasting one."""
    return posixpath.join(home if owned else posixpath.dirname(home.rstrip("/")), ".hub-env")


def host_command(python: str, home: str, venv: str, repo: str, revision: str,
                 before: str = "") -> str:
    """The shell line that downloads ``repo`` at ``revision`` into the hub cache ``home`` on
    a host (``python`` if it imports huggingface_hub, else the virtualenv ``venv``, made
    once); its last line is ``DONE_MARK`` and the snapshot's path. HF_TOKEN and
    HF_ENDPOINT come from the environment. ``before``: a restore of the hub cache from
    S3 (``cache_store.hub_restore``), run first by a Python that also has boto3."""
    modules = ("huggingface_hub", "boto3") if before else ("huggingface_hub",)
    find_python = cache_store.find_python(python, venv, modules) + before
    return (f"mkdir -p {shlex.quote(home)}/hub && {find_python}"
            f"exec $PY -c {shlex.quote(HOST_SCRIPT)} {shlex.quote(repo)} "
            f"{shlex.quote(revision)} {shlex.quote(home + '/hub')}")


def boot_request(run: Run) -> dict[str, str] | None:
    """What the machine may start downloading at boot (for the launch options): a hub
    model that needs no token, on a provider that does boot work."""
    if (not run.caps.boot_dir or run.caps.runs is not Runs.MACHINE or run.job.image == "host"
            or _env_value(run, "HF_TOKEN") or cache_store.is_s3(_location(run))):
        return None   # (an S3 hub cache is restored first, with the script sent over SSH)
    _, hub_id = run._model_source()
    if not hub_id:
        return None
    return {"repo": hub_id, "revision": run.job.model.revision or "",
            "cache": _location(run) or "", "endpoint": _env_value(run, "HF_ENDPOINT") or ""}


def _host_home(run: Run, location: str | None) -> str:
    if location is None:
        return f"{run.workdir}/hf"
    if location == "auto" or cache_store.is_s3(location):   # S3: restored into the 'auto' place
        return posixpath.join(posixpath.dirname(run.workdir.rstrip("/")), ".cache", "hf")
    return location


def _boot_download(run: Run, host: Remote, hub_id: str, home: str) -> BootTask | None:
    """The download the machine started at boot, when it is this model at this revision
    into the cache the run uses (any cache of the run's own when the job names none)."""
    if not run.caps.boot_dir:
        return None
    task = read_boot_task(host, f"{run.caps.boot_dir}/weights")
    repo, revision, where = (task.want + ["", "", ""])[:3]
    if task.state == "none" or repo != hub_id or revision != (run.job.model.revision or ""):
        return None
    if not where or (_location(run) is not None and where != home):
        return None
    return task


def start_on_host(run: Run, host: Remote) -> WeightsJob | None:
    """A machine that runs the image through its own Docker: the download the machine
    started at boot, joined, or a detached download on the host, into a cache directory
    the container mounts at the same path."""
    _, hub_id = run._model_source()
    if not hub_id or run.caps.runs is not Runs.MACHINE or run.job.image == "host":
        return None
    location = _location(run)
    home = _host_home(run, location)
    boot = _boot_download(run, host, hub_id, home)
    if boot is not None:
        home = boot.want[2]
    detail = (f"joining the download of {hub_id} started at boot, into {home}" if boot
              else f"{hub_id} into {home} on the host")
    job = WeightsJob(hub_id, run.job.model.revision, home, home, _open_record(run, detail),
                     location is None, boot=boot is not None)
    if not job.boot:
        _start_on(run, host, job)
    run.weights = job
    return job


def _start_on(run: Run, host: Remote, job: WeightsJob) -> None:
    """Start the download on the host, detached (its output in the run's logs)."""
    venv = hub_venv(job.host_home, owned=job.owned)
    command = host_command(run.settings.hub_python, job.host_home, venv, job.repo_id,
                           job.revision or "",
                           before=cache_store.hub_restore(run, host, job.host_home, job.repo_id))
    env = {k: v for k in ("HF_TOKEN", "HF_ENDPOINT") if (v := _env_value(run, k))}
    try:
        job.handle = host.start(command, env=env, cwd=run.workdir, log_file=f"{run.workdir}/logs/weights.log")
    except Exception as exc:  # noqa: BLE001 - vLLM downloads instead
        job.result["error"] = f"{type(exc).__name__}: {exc}"


def _wait_boot(run: Run, job: WeightsJob, deadline: float) -> bool:
    """Wait for the boot download; False when it failed or never ran (the run then
    downloads itself)."""
    host = run._host_remote()
    where = f"{run.caps.boot_dir}/weights"
    since = time.monotonic()
    task = wait_boot_task(host, where, deadline, lambda _seen: run.reporter.progress(
        f"weights: waiting for the download started at boot ({time.monotonic() - since:.0f}s)"))
    if task is None:
        job.result["error"] = "the download started at boot did not finish in time"
        return True
    marks = [ln for ln in task.log if ln.startswith(DONE_MARK)]
    if task.rc == 0 and marks:
        job.result["snapshot"] = marks[-1][len(DONE_MARK):].strip()
        run._log(f"weights: joined the download of {job.repo_id} started at boot (done)")
        return True
    why = (f"exit status {task.rc}: {(task.log or ['no output'])[-1][-200:]}" if task.rc is not None
           else "it is not running")
    run._log(f"weights: the download started at boot failed ({why}); downloading here")
    return False


def _wait_host(run: Run, job: WeightsJob, deadline: float) -> None:
    host = run._host_remote()
    if job.boot:
        if _wait_boot(run, job, deadline):
            return
        _start_on(run, host, job)
    while job.handle and host.is_running(job.handle):
        if time.monotonic() > deadline:
            job.result["error"] = "the download did not finish in time"
            host.stop(job.handle)
            return
        time.sleep(1.0)
    log = host.run(f"tail -n 20 {shlex.quote(run.workdir)}/logs/weights.log", timeout=30)
    cache_store.report_hub_restore(run, host, f"{run.workdir}/logs/weights.log")
    marks = [ln for ln in log.output_tail.splitlines() if ln.startswith(DONE_MARK)]
    if marks:
        job.result["snapshot"] = marks[-1][len(DONE_MARK):].strip()
    else:
        job.result.setdefault("error", log.output_tail.strip()[-300:] or "no output")


def finish(run: Run, hub_id: str) -> str:
    """Wait for the download; what vLLM loads: the snapshot's path where the server runs
    (a path fixed by the model and its revision), or ``hub_id`` when nothing was
    downloaded (vLLM then downloads it itself)."""
    job = getattr(run, "weights", None)
    if job is None or not hub_id:
        return hub_id
    deadline = run.work_deadline
    if job.thread is not None:
        while job.thread.is_alive() and time.monotonic() < deadline:
            job.thread.join(timeout=0.5)
            run.reporter.progress(f"weights: {_size(Path(job.host_home))} downloaded")
    elif "error" not in job.result:
        _wait_host(run, job, deadline)
    _close_record(run, job, ok="snapshot" in job.result)
    if "snapshot" not in job.result:
        run.reporter.warn(f"weights: the download of {hub_id} failed "
                          f"({job.result.get('error', 'timed out')}); vLLM downloads it instead")
        return hub_id
    snapshot = job.container_path(job.result["snapshot"])
    run._log(f"weights: {hub_id} ready at {snapshot}")
    return snapshot


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return f"{total / 2**20:.1f} MiB"


def _close_record(run: Run, job: WeightsJob, ok: bool) -> None:
    if job.record.ended_at is None:
        job.record.ended_at = datetime.now(UTC)
        job.record.ok = ok
        run._log(f"{'ok' if ok else 'failed'} weights ({job.record.seconds:.1f}s)")


def server_env(run: Run) -> dict[str, str]:
    """HF_HOME for the server where the weights were downloaded for it."""
    job = getattr(run, "weights", None)
    return {"HF_HOME": job.container_home} if job is not None and "snapshot" in job.result else {}


def close(run: Run) -> None:
    """At teardown: the phase record closed, a download of the run's own removed (on this
    machine; on a host it went with the run directory)."""
    job = getattr(run, "weights", None)
    if job is None:
        return
    _close_record(run, job, ok="snapshot" in job.result)
    if job.owned and job.thread is not None:
        job.thread.join(timeout=5)
        shutil.rmtree(job.host_home, ignore_errors=True)


def host_mounts(run: Run, job: WeightsJob | None) -> list[str]:
    """Directories outside the run directory the job's container needs (a lasting hub
    cache), made on the host first."""
    if job is None or inside(job.host_home, run.workdir):
        return []
    return [job.host_home]
