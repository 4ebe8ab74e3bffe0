"""The ``docker`` provider: a container on the Docker engine named by the usual
DOCKER_HOST settings, as a throw-away machine.

The container's PID 1 is a dead-man switch: ``sleep`` until the run's expiry, under
Docker's init so exec'd processes are reaped. With ``auto_remove`` the engine deletes
the container when that sleep ends, so it disappears at ``expires-at`` even if
ephemera was killed. Commands and file copies go through the Docker API (no sshd in
the image); with ``exec: ssh`` the image's own sshd is started with the run's key and
the shared SSH channel is used instead. Ports are published on 127.0.0.1 only
(bridge) unless the job asks for host networking.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from ephemera_providers.docker_remote import DockerRemote

from ephemera.errors import ConfigError, InfraError, TeardownError
from ephemera.provider import (
    LABEL_KEYS,
    BuiltinImage,
    Capabilities,
    Endpoint,
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    OfferRequest,
    PortChoice,
    Runs,
    parse_time,
)
from ephemera.transport.remote import Remote

__all__ = ["DockerProvider", "DockerRemote"]

LABEL_PREFIX = "dev.ephemera."
TAG_PREFIX = "dev.ephemera.tag."
WORKROOT = "/ephemera"
# Not canonical labels: how to reach the container over SSH (exec: ssh), kept on the
# container so another process can connect from the container alone.
SSH_PORT_LABEL = "dev.ephemera.ssh-port"
SSH_KEY_LABEL = "dev.ephemera.ssh-public-key"
SSH_KEY_PATH_LABEL = "dev.ephemera.ssh-key-path"
TERMINATE_VERIFY_SECONDS = 20.0


def docker_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Canonical keys become ``dev.ephemera.<key>``; user labels ``dev.ephemera.tag.<key>``."""
    out = {}
    for key, value in labels.items():
        prefix = LABEL_PREFIX if key in LABEL_KEYS else TAG_PREFIX
        out[f"{prefix}{key}"] = str(value)
    return out


def canonical_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Inverse of :func:`docker_labels`; labels not ours are dropped."""
    out = {}
    for key, value in (labels or {}).items():
        if key.startswith(TAG_PREFIX):
            out[key[len(TAG_PREFIX):]] = value
        elif key.startswith(LABEL_PREFIX) and key[len(LABEL_PREFIX):] in LABEL_KEYS:
            out[key[len(LABEL_PREFIX):]] = value
    return out


def container_name(run_id: str) -> str:
    return f"ephemera-{run_id}"


def docker_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The job's docker section: ``options["docker"]`` when nested, else ``options``."""
    nested = options.get("docker") if isinstance(options, Mapping) else None
    raw = dict(nested) if isinstance(nested, Mapping) else dict(options or {})
    network = raw.get("network", "bridge")
    if network not in ("bridge", "host"):
        raise ConfigError(f"resources.docker.network: must be 'bridge' or 'host', not {network!r}")
    exec_mode = raw.get("exec", "docker")
    if exec_mode not in ("docker", "ssh"):
        raise ConfigError(f"resources.docker.exec: must be 'docker' or 'ssh', not {exec_mode!r}")
    raw["network"] = network
    raw["exec"] = exec_mode
    raw.setdefault("shm_size", "1g")
    return raw


def nvidia_gpus() -> list[tuple[str, float, float | None]]:
    """(name, memory GiB, compute capability) per GPU on this host, from nvidia-smi; []
    without it."""
    from ephemera_providers.local import parse_nvidia_smi, query_nvidia_smi

    return parse_nvidia_smi(query_nvidia_smi(timeout=20))


def _free_local_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state_of(status: str) -> InstanceState:
    return {
        "created": InstanceState.PENDING,
        "running": InstanceState.RUNNING,
        "restarting": InstanceState.RUNNING,
        "paused": InstanceState.RUNNING,
        "removing": InstanceState.TERMINATING,
        "exited": InstanceState.TERMINATED,
        "dead": InstanceState.FAILED,
    }.get(status, InstanceState.PENDING)


class DockerProvider:
    """Containers on a Docker engine. See the module docstring."""

    name: ClassVar[str] = "docker"

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        """The instance is the job's image. On the host network the engine's machine is
        shared with other runs (a free port); on a bridge the port is published on
        127.0.0.1 and the server listens on every address inside the container."""
        network = (options.get("docker") or {}).get("network", "bridge")
        host = network == "host"
        return Capabilities(runs=Runs.IMAGE, port=PortChoice.FREE_HERE if host else PortChoice.FIXED,
                            server_bind="127.0.0.1" if host else "0.0.0.0",
                            builtin_image=BuiltinImage.LOCAL_ENGINE, pulls_before_launch=True)

    def __init__(self, client: Any = None) -> None:
        self._client = client

    # -- engine ------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            from ephemera.transport.docker_engine import connect_docker

            client = connect_docker("the docker provider")
            self._client = client
        return self._client

    def describe(self) -> str:
        return "Containers on the local Docker engine (DOCKER_HOST); GPUs via nvidia-smi."

    @classmethod
    def check(cls) -> tuple[bool, str]:
        """For ``ephemera check``: does the engine named by DOCKER_HOST answer, and which
        GPUs can its containers get (nvidia-smi, and the engine's nvidia runtime)?"""
        import os

        try:
            import docker
        except ImportError:
            return False, "the Docker SDK is not installed: pip install 'ephemera-gpu[docker]'"
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        try:
            client = docker.from_env(timeout=5)
            info = client.info()
            client.close()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the engine
            return False, f"cannot reach the Docker engine at {where}: {exc}"
        gpus = nvidia_gpus()
        runtime = "nvidia" in (info.get("Runtimes") or {})
        seen = (f"{len(gpus)} GPU(s): {', '.join(sorted({g[0] for g in gpus}))}" if gpus
                else "no GPUs (nvidia-smi found none): CPU jobs only")
        if gpus and not runtime:
            seen += "; the engine has no nvidia runtime (install the NVIDIA Container Toolkit)"
        return True, (f"Docker {info.get('ServerVersion', '?')} at {where}, "
                      f"{info.get('NCPU', '?')} CPUs; {seen}")

    # -- offers ------------------------------------------------------------------
    def offers(self, request: OfferRequest) -> list[Offer]:
        info = self.client.info()
        vcpus = int(info.get("NCPU") or 1)
        memory = round(float(info.get("MemTotal") or 0) / 2**30, 1)
        gpus = nvidia_gpus()
        if not gpus:
            return [Offer(provider=self.name, instance_type="docker-cpu", region=None, gpu=None,
                          gpu_count=0, gpu_memory_gib=0.0, vcpus=vcpus, memory_gib=memory,
                          price_per_hour=0.0, price_source="local engine")]
        name, per_gpu = gpus[0][0], min(g[1] for g in gpus)
        caps = [g[2] for g in gpus if g[2] is not None]
        offers = [Offer(provider=self.name, instance_type=f"docker-{count}x{name.replace(' ', '-')}",
                        region=None, gpu=name, gpu_count=count, gpu_memory_gib=round(per_gpu, 1),
                        vcpus=vcpus, memory_gib=memory, price_per_hour=0.0,
                        price_source="local engine", compute_capability=min(caps) if caps else None)
                  for count in range(1, len(gpus) + 1)]
        if request.gpu:
            offers = [o for o in offers if request.gpu.lower() in (o.gpu or "").lower()]
        return offers

    # -- launch ------------------------------------------------------------------
    def pull_image(self, name: str, progress: Callable[[str], None] | None = None) -> str:
        """The image ready on the engine (pulled when missing, with ``progress`` told the
        layers done / total). Called before launch, where signals are not held: a
        cancel during a long pull stops it at once."""
        return self._image(name, progress)

    def _image(self, name: str, progress: Callable[[str], None] | None = None) -> str:
        import docker

        from ephemera.builtins.cpu_image import IMAGE_REPO, resolve_image

        ref = resolve_image(name)
        try:
            self.client.images.get(ref)
            return ref
        except docker.errors.ImageNotFound:
            pass
        if ref.split(":")[0] == IMAGE_REPO:
            raise ConfigError(f"image: the built-in CPU image {ref} is not built on this engine",
                              hint="Build it with: ephemera image build-cpu.")
        try:
            self._pull(ref, progress or (lambda _text: None))
        except docker.errors.APIError as exc:
            raise ConfigError(f"image: {ref!r} is not on this Docker engine and pulling it failed: "
                              f"{exc.explanation or exc}",
                              hint="Check the name, log in to its registry, or build it here.") from None
        return ref

    def _pull(self, ref: str, progress: Callable[[str], None]) -> None:
        """Pull ``ref`` through the engine's progress stream: layers done / total."""
        import docker

        repo, tag = docker.utils.parse_repository_tag(ref)
        layers: dict[str, str] = {}
        for event in self.client.api.pull(repo, tag=tag or "latest", stream=True, decode=True):
            if event.get("error"):
                raise docker.errors.APIError(event["error"])
            layer, status = event.get("id"), str(event.get("status", ""))
            if not layer or status.startswith(("Pulling from", "Digest", "Status")):
                continue
            layers[layer] = status
            done = sum(s in ("Pull complete", "Already exists") for s in layers.values())
            note = f"pulling {ref}: {done}/{len(layers)} layers"
            detail = event.get("progressDetail") or {}
            if status == "Downloading" and detail.get("total"):
                note += f" ({layer[:12]} {detail.get('current', 0) / 2**20:.0f}/{detail['total'] / 2**20:.0f} MiB)"
            progress(note)
        progress(f"pulled {ref}: {len(layers)} layers")

    def launch(self, spec: LaunchSpec) -> Instance:
        import docker

        name = container_name(spec.run_id)
        try:
            existing = self.client.containers.get(name)
            return self._instance(existing, spec.run_id)
        except docker.errors.NotFound:
            pass
        opts = docker_options(spec.options)
        seconds = math.ceil((spec.expires_at - datetime.now(UTC)).total_seconds())
        if seconds < 1:
            raise ConfigError(f"expires_at {spec.expires_at.isoformat()} is already past")
        image = self._image(spec.image)
        kwargs: dict[str, Any] = {
            "name": name,
            "labels": docker_labels(spec.labels),
            # PID 1 is the dead-man switch; the engine removes the container when it ends.
            "entrypoint": ["sleep"],
            "command": [str(seconds)],
            "init": True,
            "auto_remove": True,
            "detach": True,
            "environment": dict(spec.env),
            # The job's code cannot gain privileges inside (setuid binaries, file caps).
            "security_opt": ["no-new-privileges"],
            # The engine makes the run's directory as it creates the container.
            "working_dir": f"{WORKROOT}/{spec.run_id}",
        }
        if opts.get("ipc") == "host":
            kwargs["ipc_mode"] = "host"
        else:
            kwargs["shm_size"] = str(opts["shm_size"])
        if opts["network"] == "host":
            kwargs["network_mode"] = "host"
        else:
            kwargs["ports"] = {f"{port}/tcp": ("127.0.0.1", None) for port in spec.ports}
        if spec.gpu_count > 0:
            if not nvidia_gpus():
                raise ConfigError(f"the plan asks for {spec.gpu_count} GPU(s) but this Docker "
                                  "host has none (nvidia-smi found no GPU)")
            kwargs["device_requests"] = [docker.types.DeviceRequest(
                count=spec.gpu_count, capabilities=[["gpu"]])]
        if opts["exec"] == "ssh":
            public_key, key_path = spec.ssh_public_key, spec.ssh_private_key_path
            if not public_key:
                # No key from the controller: make one for this run, beside its state.
                from ephemera.spec.settings import get_settings
                from ephemera.transport.ssh import generate_keypair

                path, public_key = generate_keypair(
                    get_settings().state_dir / "keys" / f"docker-{spec.run_id}")
                key_path = str(path)
            ssh_port = _free_local_port() if opts["network"] == "host" else 22
            if opts["network"] != "host":
                kwargs["ports"]["22/tcp"] = ("127.0.0.1", None)
            kwargs["labels"].update({SSH_PORT_LABEL: str(ssh_port),
                                     SSH_KEY_LABEL: public_key.strip(),
                                     SSH_KEY_PATH_LABEL: key_path or ""})
        mounts = opts.get("mounts") or []
        if mounts:
            kwargs["volumes"] = list(mounts)
        try:
            container = self.client.containers.run(image, **kwargs)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # a concurrent launch of the same run won
                return self._instance(self.client.containers.get(name), spec.run_id)
            raise InfraError(f"docker could not start {name} from {image}: "
                             f"{exc.explanation or exc}") from None
        return self._instance(container, spec.run_id, network=opts["network"])

    def _instance(self, container: Any, run_id: str, network: str | None = None,
                  workdir: str | None = None, endpoint: Endpoint | None = None) -> Instance:
        attrs = container.attrs
        host_config = attrs.get("HostConfig") or {}
        network = network or ("host" if host_config.get("NetworkMode") == "host" else "bridge")
        ports: dict[str, int] = {}
        for key, bindings in ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).items():
            if bindings:
                ports[key.split("/")[0]] = int(bindings[0]["HostPort"])
        created = attrs.get("Created")
        state = _state_of(container.status)
        if workdir and state == InstanceState.RUNNING:
            state = InstanceState.READY
        return Instance(
            provider=self.name,
            id=container.id,
            run_id=run_id,
            state=state,
            labels=canonical_labels(container.labels),
            instance_type="docker",
            workdir=workdir if state == InstanceState.READY else None,
            launched_at=parse_time(created[:19] + "Z") if created else None,
            message="" if state != InstanceState.FAILED else f"container is {container.status}",
            data={"container_id": container.id, "name": container.name, "network": network,
                  "ports": json.dumps(ports, sort_keys=True),
                  "exec": "ssh" if SSH_PORT_LABEL in (container.labels or {}) else "docker"},
            endpoint=endpoint,
        )

    # -- poll / terminate / find ------------------------------------------------
    def _get(self, instance: Instance) -> Any | None:
        import docker

        key = instance.data.get("container_id") or instance.id or container_name(instance.run_id)
        try:
            return self.client.containers.get(key)
        except docker.errors.NotFound:
            return None

    def poll(self, instance: Instance) -> Instance:
        container = self._get(instance)
        if container is None:
            return instance.evolve(state=InstanceState.TERMINATED, workdir=None)
        current = self._instance(container, instance.run_id)
        if current.state != InstanceState.RUNNING:
            return current
        workdir = f"{WORKROOT}/{instance.run_id}"
        endpoint = instance.endpoint
        if instance.state != InstanceState.READY:
            made = (container.attrs.get("Config") or {}).get("WorkingDir") == workdir
            done = None if made else container.exec_run(["mkdir", "-p", workdir])
            if done is not None and done.exit_code != 0:
                return current.evolve(message=f"could not create {workdir} in the container")
            if current.data.get("exec") == "ssh":
                try:
                    endpoint = self._start_sshd(container, current)
                except InfraError as exc:
                    return current.evolve(state=InstanceState.FAILED, message=exc.message)
        return self._instance(container, instance.run_id, workdir=workdir, endpoint=endpoint)

    def _start_sshd(self, container: Any, current: Instance) -> Endpoint:
        """exec: ssh: authorise the run's key, start the image's sshd, pin its host key."""
        labels = container.labels
        port = int(labels[SSH_PORT_LABEL])
        listen = "127.0.0.1" if current.data.get("network") == "host" else "0.0.0.0"
        script = (
            "test -x /usr/sbin/sshd || { echo 'no /usr/sbin/sshd in the image'; exit 3; }; "
            "mkdir -p /root/.ssh /run/sshd && chmod 700 /root/.ssh && "
            'printf "%s\\n" "$EPHEMERA_SSH_KEY" > /root/.ssh/authorized_keys && '
            "chmod 600 /root/.ssh/authorized_keys && "
            'printf "%s\\n" "$EPHEMERA_SSH_ENV" > /root/.ssh/environment && '
            "chmod 600 /root/.ssh/environment && ssh-keygen -A >/dev/null && "
            f"/usr/sbin/sshd -p {port} -o ListenAddress={listen} -o PasswordAuthentication=no "
            "-o PermitRootLogin=prohibit-password -o PermitUserEnvironment=yes && "
            "cat /etc/ssh/ssh_host_ed25519_key.pub"
        )
        # SSH sessions do not inherit the container's environment (the image's PATH
        # and ENV, the launch's env): hand it over through ~/.ssh/environment.
        image_env = [line for line in (container.attrs.get("Config") or {}).get("Env") or []
                     if "=" in line and "\n" not in line]
        done = container.exec_run(["sh", "-c", script],
                                  environment={"EPHEMERA_SSH_KEY": labels[SSH_KEY_LABEL],
                                               "EPHEMERA_SSH_ENV": "\n".join(image_env)})
        output = done.output.decode(errors="replace").strip()
        if done.exit_code != 0:
            raise InfraError(f"exec: ssh: could not start sshd in the container: {output[-300:]}",
                             hint="The image needs openssh-server, or use exec: docker.")
        host_key = " ".join(output.splitlines()[-1].split()[:2])
        ports = json.loads(current.data.get("ports") or "{}")
        host_port = port if current.data.get("network") == "host" else int(ports["22"])
        return Endpoint(host="127.0.0.1", port=host_port, user="root",
                        key_path=labels.get(SSH_KEY_PATH_LABEL) or None, host_key=host_key)

    def terminate(self, instance: Instance) -> None:
        import docker

        container = self._get(instance)
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # 409: auto-remove is already under way; the check below decides.
                if exc.status_code != 409:
                    raise InfraError(f"docker could not remove {container.name}: "
                                     f"{exc.explanation or exc}") from None
        deadline = time.monotonic() + TERMINATE_VERIFY_SECONDS
        while self._get(instance) is not None:
            if time.monotonic() > deadline:
                raise TeardownError(f"container {container_name(instance.run_id)} "
                                    f"({instance.id[:12]}) is still present after removal",
                                    hint=f"Remove it with: docker rm -f {instance.id[:12]}")
            time.sleep(0.2)
        self._forget_key(instance.run_id)

    @staticmethod
    def _forget_key(run_id: str) -> None:
        """Delete the SSH key this provider made for the run (exec: ssh), if any."""
        from ephemera.spec.settings import get_settings

        shutil.rmtree(get_settings().state_dir / "keys" / f"docker-{run_id}", ignore_errors=True)

    def find(self, labels: Mapping[str, str]) -> list[Instance]:
        filters = [f"{k}={v}" for k, v in docker_labels(labels).items()] or [
            f"{LABEL_PREFIX}run-id"]
        found = self.client.containers.list(all=True, filters={"label": filters})
        return [self._instance(c, c.labels.get(f"{LABEL_PREFIX}run-id", "")) for c in found]

    # -- connect -----------------------------------------------------------------
    def connect(self, instance: Instance) -> Remote:
        if instance.data.get("exec") == "ssh":
            from ephemera.transport.ssh_remote import SSHRemote

            if instance.endpoint is None:
                raise InfraError("exec: ssh: the container is not ready (no SSH endpoint yet)")
            return SSHRemote.from_endpoint(instance.endpoint)
        ports = json.loads(instance.data.get("ports") or "{}")
        return DockerRemote(self.client, instance.data.get("container_id") or instance.id,
                            network=instance.data.get("network", "bridge"),
                            ports={int(k): int(v) for k, v in ports.items()})
