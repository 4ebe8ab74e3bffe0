"""The machine side of a run: the job's image as a container on a machine's Docker (the
"image" phase), and the channel to the machine itself past that container.
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ephemera.lifecycle import caches, weights
from ephemera.provider import Runs
from ephemera.transport.container import ContainerRemote, prepare_host
from ephemera.transport.remote import Remote

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run


def host_remote(run: Run) -> Remote:
    """The channel to the machine itself: past the job's container when there is one."""

    assert run.remote is not None
    return run.remote.host if isinstance(run.remote, ContainerRemote) else run.remote


def connect(run: Run, image: str) -> Remote:
    """The channel the run's commands go through: the provider's to the instance, or,
    where the machine runs the job's image through its own Docker, the job's container
    on it (the "image" phase: the run's directories made as the login user, how that user
    reaches Docker, then the container, which also expires by itself). Where the machine
    started work at boot (``Capabilities.boot_dir``), the image phase waits for its pull
    and the weights phase for its download instead of starting them again."""
    assert run.instance is not None and run.provider is not None
    run.workdir = run.instance.workdir or f"/tmp/ephemera/{run.run_id}"
    remote = run.provider.connect(run.instance)
    if run.caps.runs is not Runs.MACHINE or image == "host":
        return remote
    # The weights download on the host runs beside the image pull (after SSH: a gated
    # model's token reaches the machine only through this channel).
    downloading = weights.start_on_host(run, remote)
    with run.phase("image", image):
        docker, user = prepare_host(remote, run.workdir, f"{run.instance.id} ({run.provider_name})")
        network = run.caps.container_network
        run.remote = remote   # the free port is asked on the machine itself
        container = ContainerRemote(remote, f"ephemera-{run.run_id}", run.workdir, run.run_id,
                                    docker=docker, user=user, network=network,
                                    port=run.server_port() if network == "bridge" else None)
        container.mounts = weights.host_mounts(run, downloading) + caches.host_mounts(run)
        # Made by the login user before Docker would make them as root.
        remote.run("mkdir -p " + " ".join(shlex.quote(d) for d in container.mounts), timeout=60)
        expires_at = run.state.expires_at if run.state else datetime.now(UTC) + timedelta(hours=1)
        container.start_container(image, gpus=run.offer.gpu_count if run.offer else 0,
                                  expires_at=expires_at, timeout=run._time_left("image"),
                                  progress=run.reporter.progress, boot_dir=run.caps.boot_dir)
        if container.boot_pull:
            run._log(f"image: {container.boot_pull}")
    return container
