"""The collect stage: the server's log, the suite's artifacts and the files the job
names, never through a link or from outside the run directory, masked before anyone
reads them; a channel that stopped answering is replaced first.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ephemera.errors import (
    Interrupted,
)
from ephemera.lifecycle.faults import fault_point
from ephemera.transport.container import ContainerRemote

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run


def ensure_channel(run: Run, budget: float) -> bool:
    """Whether the channel answers (within ``budget`` seconds, at most 10). One that
    stopped answering (a frozen peer, a dropped tunnel) is replaced by a fresh
    connection before the logs are pulled, instead of waiting on the old one - but
    not after a signal: then the machine's end comes first, and the logs are given up."""
    assert run.remote is not None
    try:
        if run.remote.run("true", timeout=max(0.2, min(10.0, budget))).ok:
            return True
    except Interrupted:
        raise
    except Exception:  # noqa: BLE001
        pass
    if run.provider is None or run.instance is None:
        return False
    if run._signal is not None:
        run.reporter.warn("the channel to the instance is not answering: not collecting, "
                           "tearing down at once")
        return False
    run.reporter.warn("the channel to the instance stopped answering; reconnecting to collect the logs")
    old = run.remote
    try:
        fresh = run.provider.connect(run.instance)
    except Exception as exc:  # noqa: BLE001
        run.reporter.warn(f"reconnect failed: {type(exc).__name__}: {exc}")
        return False

    stale = old.host if isinstance(old, ContainerRemote) else old
    if isinstance(old, ContainerRemote):
        old.host = fresh
    else:
        run.remote = fresh

    # Closing a transport whose peer is frozen may block: do it off the main thread.
    threading.Thread(target=stale.close, daemon=True).start()
    return True


Fetched = tuple[list[Path] | None, list[str], str]   # files (None: no time left), refused, error


def _fetch_one(run: Run, remote_path: str, local: Path, deadline: float) -> Fetched:
    left = deadline - time.monotonic()
    if left <= 0:
        return None, [], ""
    refused: list[str] = []
    try:
        got = run.remote.get(remote_path, local, timeout=left, within=run.workdir, refused=refused)
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - collect is best effort, teardown must follow
        return [], refused, f"{type(exc).__name__}: {exc}"
    return got, refused, ""


def _fetch_all(run: Run, wanted: list[str], deadline: float) -> list[Fetched]:
    """Each wanted path fetched into the artifacts; in one go where the channel can
    (``get_many``: one check for all, where each check is a round trip)."""
    get_many = getattr(run.remote, "get_many", None)
    if get_many is None or len(wanted) < 2:
        return [_fetch_one(run, path, run.artifacts_dir, deadline) for path in wanted]
    refused: list[str] = []
    try:
        got = get_many(wanted, run.artifacts_dir, timeout=max(0.1, deadline - time.monotonic()),
                       within=run.workdir, refused=refused)
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - one at a time then, each with its own error
        run.reporter.warn(f"collecting in one go failed ({type(exc).__name__}: {exc}); one at a time")
        return [_fetch_one(run, path, run.artifacts_dir, deadline) for path in wanted]
    return [(files, refused if index == 0 else [], "") for index, files in enumerate(got)]


def collect(run: Run, budget: float, suspect_channel: bool = False) -> None:
    if run.remote is None:
        return
    deadline = time.monotonic() + budget
    run.artifacts_dir.mkdir(parents=True, exist_ok=True)
    wd = run.workdir
    wanted = [f"{wd}/logs/vllm.log", f"{wd}/artifacts"]
    wanted += [entry if entry.startswith("/") else f"{wd}/suite/{entry}" for entry in run.job.artifacts]
    with run.phase("collect"):
        fault_point("collect")
        if suspect_channel and not run._ensure_channel(0.5 if run._signal else budget):
            return
        results = _fetch_all(run, wanted, deadline)
        for remote_path, (got, refused, error) in zip(wanted, results, strict=True):
            for why in refused:
                run.reporter.warn(f"not collected: {why}")
            if error:
                run.reporter.warn(f"could not collect {remote_path}: {error}")
            elif got is None:
                run.reporter.warn(f"no time left to collect {remote_path}")
            elif not got and not remote_path.endswith("/artifacts"):
                run.reporter.warn(f"artifact {remote_path} was not found on the instance")
        # The suite's output, the server's log and every text artifact (JUnit's
        # system-out included) are masked before anyone reads them.
        for path in run.masker.mask_tree(run.artifacts_dir):
            run.reporter.warn(f"could not check {path} for secrets (binary or too large): "
                               "treat it as sensitive")
        run._log(f"artifacts in {run.artifacts_dir}")
