"""Caches kept in an S3 prefix: ``cache.weights`` and ``cache.compile`` (or their
settings) given as ``s3://bucket/prefix``.

The machine moves the caches itself, with its own credentials (on aws the instance
profile of the ``aws_instance_profile`` setting, passed at launch; the provider refuses
an s3:// cache without it), through ``ephemera/builtins/s3_cache.py`` copied into the
run's directory and run by a Python with boto3 (``hub_python`` when it has it, else a
virtualenv of its own). On the machine the caches live where ``auto`` puts them (beside
the runs' directories); S3 is where they come from and go back to:

- restore, the hub cache in the weights phase, beside the image pull, right before the
  download (which then finds every file and asks the hub for metadata only); a compile
  cache once its key is known, before its manifest is checked (only a stored manifest
  exactly like the key's own is restored);
- save, in the ``cache_save`` phase at the end of the suite (passed or failed), before
  teardown, bounded in time: what is not in S3 yet with the same size.

A restore or save that fails is a warning: it costs time, never the run.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.errors import ConfigError
from ephemera.provider import Runs
from ephemera.spec.job import s3_location_problem

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run
    from ephemera.transport.remote import Remote

SCRIPT = Path(__file__).resolve().parent.parent / "builtins" / "s3_cache.py"
MARK = "@@s3cache "
RESTORE_SECONDS = 900.0     # a restore stops starting transfers after this long
SAVE_SECONDS = 600.0        # the cache_save phase's own limit (the job's deadline first)
MIN_SAVE_SECONDS = 15.0     # less than this left before the deadline: no save
OPTION = "s3_caches"        # LaunchSpec.options key: {field: location} for the provider


@dataclass
class S3Caches:
    """What a run restored from S3, so the same goes back at the end."""

    script: str = ""                          # the script's path on the machine
    hub: tuple[str, str, str] | None = None   # (location, hub cache dir, repo folder)
    compile: tuple[str, str, str] | None = None   # (location, compile root, key)


def configured(run: Run, name: str) -> str | None:
    """Where the ``name`` cache ("weights" or "compile") lives: ``cache.<name>``, else its
    setting, else ``auto`` on a machine booted from a baked image (which holds the caches
    where ``auto`` puts them), else None (no lasting cache)."""
    value = getattr(run.job.cache, name) or getattr(run.settings, f"cache_{name}")
    plan = getattr(run, "plan", None)
    if value is None and plan is not None and plan.machine_image:
        return "auto"
    return value


def is_s3(location: str | None) -> bool:
    return bool(location) and str(location).startswith("s3://")


def locations(run: Run) -> dict[str, str]:
    """{field, as the user named it: s3:// location} for the run's caches in S3."""
    out = {}
    for name in ("weights", "compile"):
        job_value = getattr(run.job.cache, name)
        value = job_value or getattr(run.settings, f"cache_{name}")
        if is_s3(value):
            out[f"cache.{name}" if job_value else f"cache_{name} setting"] = value
    return out


def check(run: Run) -> None:
    """Before anything is launched: S3 caches only where the machine itself can reach
    S3 and runs the job's image through its own Docker."""
    for field, url in locations(run).items():
        problem = s3_location_problem(url)
        if problem:
            raise ConfigError(f"{field}: {problem}")
        if run.caps.runs is not Runs.MACHINE:
            raise ConfigError(f"{field}: an s3:// location is kept by a machine that runs the job's "
                              f"image through its own Docker (e.g. aws); the {run.provider_name} "
                              "provider takes 'auto' or a directory (docker: a volume for compile)")
        if "weights" in field and run.job.image == "host":
            raise ConfigError(f"{field}: with image 'host' vLLM downloads the weights itself; an "
                              "s3:// hub cache needs the job's image (run through the machine's Docker)")


def launch_options(run: Run) -> dict[str, Any]:
    """What the provider is told at launch (aws: an instance profile is needed)."""
    found = locations(run)
    return {OPTION: found} if found else {}


def stage_root(run: Run) -> str:
    """Where S3 caches live on the machine: beside the runs' directories, as 'auto'."""
    return posixpath.join(posixpath.dirname(run.workdir.rstrip("/")), ".cache")


def find_python(python: str, venv: str, modules: tuple[str, ...]) -> str:
    """Shell that sets ``$PY`` to a Python importing ``modules``: ``python``, else the
    virtualenv ``venv`` (made, and the modules installed, when it lacks them)."""
    need = shlex.quote("import " + ", ".join(modules))
    py, env = shlex.quote(python), shlex.quote(venv)
    return (f"PY=; for c in {py} {env}/bin/python; do \"$c\" -c {need} 2>/dev/null && "
            f"{{ PY=$c; break; }}; done; [ -n \"$PY\" ] || {{ {{ [ -x {env}/bin/python ] || "
            f"python3 -m venv {env}; }} && {env}/bin/pip install -q {' '.join(modules)} && "
            f"PY={env}/bin/python; }}; ")


def _state(run: Run) -> S3Caches:
    if getattr(run, "s3_caches", None) is None:
        run.s3_caches = S3Caches()
    return run.s3_caches


def _ship(run: Run, host: Remote) -> str:
    """The script on the machine, in the run's directory (copied once per run)."""
    state = _state(run)
    if not state.script:
        target = f"{run.workdir}/ephemera-s3-cache.py"
        host.put(SCRIPT, target, timeout=60)
        state.script = target
    return state.script


def _command(run: Run, action: str, url: str, directory: str, name: str, *extra: str,
             seconds: float) -> str:
    """``$PY script ACTION ...`` (``$PY`` set by find_python before it)."""
    offer = run.offer or (run.plan.offer if run.plan is not None else None)
    region = ["--region", offer.region] if offer is not None and offer.region else []
    args = [action, url, directory, name, *extra, "--deadline", f"{seconds:.0f}", *region]
    return f"\"$PY\" {shlex.quote(_state(run).script)} " + " ".join(shlex.quote(a) for a in args)


def _python(run: Run, modules: tuple[str, ...] = ("boto3",)) -> str:
    return find_python(run.settings.hub_python, posixpath.join(stage_root(run), ".hub-env"), modules)


def summaries(output: str) -> list[dict[str, Any]]:
    out = []
    for line in output.splitlines():
        if line.startswith(MARK):
            try:
                out.append(json.loads(line[len(MARK):]))
            except ValueError:
                continue
    return out


def report(run: Run, output: str, what: str) -> bool:
    """Log the script's summary line; warn when it failed or is missing. Whether it worked."""
    found = summaries(output)
    if not found:
        run.reporter.warn(f"{what}: no answer from the S3 cache script "
                          f"({output.strip()[-200:] or 'no output'}); going on without it")
        return False
    s = found[-1]
    if s.get("state") in ("failed", "partial"):
        run.reporter.warn(f"{what}: {s.get('state')} ({s.get('error') or str(s.get('left')) + ' left'}); "
                          "going on without the rest")
        return False
    run._log(f"{what}: {s.get('state')}, {s.get('files', 0)} files "
             f"({int(s.get('bytes', 0)) / 2**20:.1f} MiB), {s.get('skipped', 0)} already there")
    return True


# ------------------------------------------------------------------ restore
def hub_restore(run: Run, host: Remote, home: str, hub_id: str) -> str:
    """Shell for the weights phase's host command, run before the download (after
    find_python): the hub cache's files of ``hub_id`` from S3. "" when not in S3."""
    url = locations(run).get("cache.weights") or locations(run).get("cache_weights setting")
    if not url:
        return ""
    try:
        _ship(run, host)
    except Exception as exc:  # noqa: BLE001 - the download goes on without the restore
        run.reporter.warn(f"weights: could not copy the S3 cache script ({exc}); no restore")
        return ""
    folder = "models--" + hub_id.replace("/", "--")
    state = _state(run)
    state.hub = (url, f"{home}/hub", folder)
    line = _command(run, "restore-hub", url, f"{home}/hub", folder, seconds=RESTORE_SECONDS)
    return f"{line} || true; "


def report_hub_restore(run: Run, host: Remote, log_file: str) -> None:
    """After the weights phase: what the restore said in its log."""
    state = getattr(run, "s3_caches", None)
    if state is None or state.hub is None:
        return
    result = host.run(f"grep -a '^{MARK}' {shlex.quote(log_file)} | tail -n 1", timeout=30)
    report(run, result.output_tail, "weights: restore from S3")


def restore_compile(run: Run, root: str, key: str, manifest: str) -> None:
    """The key's compile cache from S3 into ``root/key`` when its stored manifest is
    exactly ``manifest`` (the caller then checks the manifest as for any cache)."""
    url = locations(run).get("cache.compile") or locations(run).get("cache_compile setting")
    if not url or run.remote is None:
        return
    _state(run).compile = (url, root, key)
    started = time.monotonic()
    try:
        host = run._host_remote()
        _ship(run, host)
        command = _python(run) + _command(run, "restore-compile", url, root, key, manifest,
                                          seconds=RESTORE_SECONDS)
        result = host.run(command, timeout=RESTORE_SECONDS + 120)
    except Exception as exc:  # noqa: BLE001 - compiling without it costs time only
        run.reporter.warn(f"compile cache: the restore from S3 failed ({exc}); compiling without it")
        return
    if report(run, result.output_tail, f"compile cache {key}: restore from {url}"):
        run._log(f"compile cache {key}: restore took {time.monotonic() - started:.1f}s")


# ------------------------------------------------------------------ save
def save(run: Run) -> None:
    """The ``cache_save`` phase: what the run has that S3 lacks, bounded in time."""
    state = getattr(run, "s3_caches", None)
    if state is None or run.remote is None or not (state.hub or state.compile):
        return
    seconds = min(SAVE_SECONDS, run.work_deadline - time.monotonic())
    if seconds < MIN_SAVE_SECONDS:
        run.reporter.warn("cache_save: too little time left before the job's deadline; not saved")
        return
    with run.phase("cache_save", "to S3") as record:
        ok = _save_all(run, state, time.monotonic() + seconds)
    record.ok = ok


def _save_all(run: Run, state: S3Caches, deadline: float) -> bool:
    ok = True
    for action, what, entry in (("save-hub", "weights: save to S3", state.hub),
                                ("save-compile", "compile cache: save to S3", state.compile)):
        left = deadline - time.monotonic()
        if entry is None:
            continue
        if left < MIN_SAVE_SECONDS:
            run.reporter.warn(f"{what}: no time left in cache_save; not saved")
            ok = False
            continue
        try:
            command = _python(run) + _command(run, action, *entry, seconds=left - 10)
            result = run._host_remote().run(command, timeout=left)
            ok = report(run, result.output_tail, what) and ok
        except Exception as exc:  # noqa: BLE001 - the next run just restores less
            run.reporter.warn(f"{what}: failed ({type(exc).__name__}: {exc})")
            ok = False
    return ok
