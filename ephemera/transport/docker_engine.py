"""One way to reach the Docker engine (named by DOCKER_HOST and friends), with the
errors users need: the SDK missing is a configuration problem, an engine that does
not answer is an infrastructure one."""

from __future__ import annotations

import os
import sys
from typing import Any

from ephemera.errors import ConfigError, InfraError


def skip_ssh_transport() -> None:
    """Before the SDK's first import: keep it from importing its SSH transport (paramiko,
    and invoke through it: about 80 ms of every run's start) unless DOCKER_HOST is an
    ssh:// address, the only case that uses it. A module set to None in ``sys.modules``
    fails to import, and the SDK imports that transport only where it may be missing."""
    if "docker" not in sys.modules and not os.environ.get("DOCKER_HOST", "").startswith("ssh://"):
        sys.modules.setdefault("docker.transport.sshconn", None)


def connect_docker(purpose: str) -> Any:
    """A pinged ``docker.DockerClient``; ``purpose`` names who needs it in the errors."""
    skip_ssh_transport()
    try:
        import docker
    except ImportError:  # pragma: no cover - docker is an extra
        raise ConfigError(f"{purpose} needs the Docker SDK for Python",
                          hint="Install it with: pip install 'ephemera-gpu[docker]'.") from None
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the engine
        raise InfraError(f"cannot reach the Docker engine: {exc}",
                         hint="Start dockerd, or point DOCKER_HOST at a running engine.") from None
    return client
