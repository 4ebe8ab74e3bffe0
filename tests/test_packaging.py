"""The wheel installs cleanly: ``ephemera`` and ``ephemera_providers`` land in
site-packages, no bare ``providers`` package does, and the console script works from
a fresh venv. The editable install of the dev venv maps the same name onto the repo's
``providers/`` folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILTIN = ("local", "docker", "ssh", "aws")


def sh(*cmd: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources, so the build leaves nothing in the repo."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("ephemera", "providers"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", root / "dist", src, timeout=300)
    [built] = (root / "dist").glob("ephemera-*.whl")
    return built


@pytest.mark.timeout(400)
def test_wheel_contents(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "ephemera" in tops and "ephemera_providers" in tops
    assert "providers" not in tops, sorted(tops)
    assert "ephemera/cli/__init__.py" in names and "ephemera_providers/__init__.py" in names
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ephemera = ephemera.cli:main" in text
    for name in BUILTIN:
        assert f"{name} = ephemera_providers." in text, text


@pytest.mark.timeout(600)
def test_wheel_installs_into_a_fresh_venv(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    python, script = venv / "bin" / "python", venv / "bin" / "ephemera"
    # pip takes its usual configuration (index, find-links), as a user's install would.
    sh(python, "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel, timeout=540)

    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .stdout.strip())
    assert (site / "ephemera" / "__init__.py").exists()
    assert (site / "ephemera_providers" / "__init__.py").exists()
    assert not (site / "providers").exists(), "a bare top-level 'providers' package was installed"
    missing = subprocess.run([python, "-c", "import providers"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr

    helped = sh(script, "--help", cwd=tmp_path)
    assert "validate" in helped.stdout and "Exit codes" in helped.stdout

    listed = subprocess.run([script, "providers"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert listed.returncode == 0, f"ephemera providers failed:\n{listed.stdout}\n{listed.stderr}"
    for name in BUILTIN:
        assert name in listed.stdout, listed.stdout
    assert "Traceback" not in listed.stdout + listed.stderr


def test_editable_install_uses_the_repo_folder(tmp_path: Path):
    """The dev venv (pip install -e .) imports ephemera_providers from providers/."""
    result = sh(sys.executable, "-c",
                "import ephemera_providers, ephemera; print(ephemera_providers.__file__);"
                " print(ephemera.__file__)", cwd=tmp_path)
    providers_file, ephemera_file = (Path(line) for line in result.stdout.split())
    assert providers_file == REPO / "providers" / "__init__.py"
    assert ephemera_file == REPO / "ephemera" / "__init__.py"
    bare = subprocess.run([sys.executable, "-c", "import providers"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert bare.returncode != 0, "'providers' must not be importable outside the repo root"
    from ephemera.registry import list_providers

    targets = {entry.name: entry.target for entry in list_providers()}
    for name in BUILTIN:
        assert targets[name].startswith(f"ephemera_providers.{name}:"), targets
