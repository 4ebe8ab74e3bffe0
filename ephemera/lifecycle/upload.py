"""The upload stage: the run directory on the machine, the suite's files and a local
model directory.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from ephemera import errors
from ephemera.lifecycle import caches

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run


def upload(run: Run, model_dir: Path | None) -> str:
    assert run.remote is not None and run.instance is not None
    wd = run.workdir
    with run.phase("upload"):
        uploads = []
        for entry in run.job.suite.files:
            local = Path(entry) if os.path.isabs(entry) else run.loaded.base_dir / entry
            relative = Path(entry).name if os.path.isabs(entry) else os.path.normpath(entry)
            uploads.append((local, f"{wd}/suite/{relative}"))
        dirs = [f"{wd}/{d}" for d in ("suite", "artifacts", "logs", "model")]
        dirs += [os.path.dirname(target) for _, target in uploads]
        # Made by the login user on the machine (not as root inside a container), so
        # the uploads, which go in as that user, can write there.
        result = run._host_remote().run(
            "mkdir -p " + " ".join(shlex.quote(d) for d in dict.fromkeys(dirs)), timeout=60)
        if not result.ok:
            raise errors.RemoteCommandError(f"could not create the run directory {wd} on the instance: "
                                            f"{result.output_tail.strip()[-300:]}", exit_status=result.exit_status)
        for local, target in uploads:
            run.remote.put(local, target, timeout=run._time_left("upload"))
        if model_dir is not None and str(model_dir) in run.mounted_models:
            path = run.mounted_models[str(model_dir)]
            run._log(f"model {model_dir.name}: mounted read-only at {path}")
            return path
        if model_dir is not None:   # at a path fixed by its content, shared by runs
            return caches.upload_model(run, model_dir, run._host_remote(), run._time_left("upload"))
    return ""
