"""Running a build step on this machine (venv, pip, debootstrap, docker build) with its
output passed on as progress lines, and its last lines in the error when it fails."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from ephemera.errors import ConfigError, InfraError

Progress = Callable[[str], None]


def run_step(cmd: list[str], progress: Progress, what: str, *, hint: str | None = None,
             **popen_kwargs: Any) -> None:
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", **popen_kwargs)
    except FileNotFoundError:
        raise ConfigError(f"{what} needs '{cmd[0]}', which is not installed",
                          hint=f"Install it (Debian/Ubuntu: apt-get install {cmd[0]}).") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        progress(f"  {line}")
    if proc.wait() != 0:
        raise InfraError(f"{what} failed (exit {proc.returncode}): " + "\n".join(tail[-10:]), hint=hint)
