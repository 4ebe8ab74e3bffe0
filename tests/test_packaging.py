"""The wheel installs cleanly: ``ephemera`` and ``ephemera_providers`` land in
site-packages, no bare ``providers`` package does, and the console script works from
a fresh venv. The editable install of the dev venv maps the same name onto the repo's
``providers/`` folder."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILTIN = ("local", "docker", "ssh", "aws")
DISTRIBUTION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
# "ephemera" on the Python package index is an unrelated project.
TAKEN = "ephemera"
# Where install lines for users and CI live.
INSTALL_LINE_FILES = ("README.md", ".github/**/*.yml", ".github/**/*.yaml", ".ci/*", "jobs/**/*.yaml",
                      "docs/**/*.md", "benchmarks/**/*.py", "ephemera/**/*.py", "providers/*.py")
INSTALLER = re.compile(r"\b(?:pip3?|pipx|uv\s+pip|uv\s+tool)\s+install\b(?P<rest>[^;&|`\n]*)")


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
    [built] = (root / "dist").glob(f"{DISTRIBUTION.replace('-', '_')}-*.whl")
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


def install_lines() -> list[tuple[str, int, str]]:
    """(file, line number, text after "install") of every install command in the files
    users and CI copy install lines from."""
    found = []
    for pattern in INSTALL_LINE_FILES:
        for path in sorted(REPO.glob(pattern)):
            if not path.is_file():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for match in INSTALLER.finditer(line):
                    found.append((str(path.relative_to(REPO)), number, match["rest"]))
    return found


def named_distributions(rest: str) -> list[str]:
    """The distribution names an install command's arguments ask for (paths, options
    and their values, and shell variables left out)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        words = shlex.split(rest, comments=True)
    except ValueError:
        words = rest.split()
    names, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = word in ("-r", "--requirement", "-c", "--constraint", "-i", "--index-url",
                            "--extra-index-url", "-f", "--find-links", "-t", "--target")
            continue
        if word.startswith((".", "/", "$", "~")) or "/" in word:
            continue
        try:   # a shell variable in a version ("ephemera[aws]==$V") stands for one
            names.append(canonicalize_name(Requirement(re.sub(r"\$\{?\w+\}?", "0", word)).name))
        except InvalidRequirement:
            continue
    return names


def test_the_distribution_is_not_the_taken_name():
    from packaging.utils import canonicalize_name

    assert canonicalize_name(DISTRIBUTION) != TAKEN
    assert canonicalize_name(DISTRIBUTION).startswith(TAKEN + "-")


def test_install_lines_name_this_distribution():
    from packaging.utils import canonicalize_name

    ours = canonicalize_name(DISTRIBUTION)
    lines = install_lines()
    wrong = [(f, n, rest) for f, n, rest in lines
             for name in named_distributions(rest) if name.startswith(TAKEN) and name != ours]
    assert not wrong, f"install lines that name another distribution than {DISTRIBUTION}: {wrong}"
    # The lines users copy do name it: the README's and the action's release install.
    naming = {f for f, _, rest in lines if ours in named_distributions(rest)}
    assert {"README.md", ".github/actions/ephemera/action.yml"} <= naming, naming


def test_install_line_parsing():
    assert named_distributions(' "ephemera[aws]==$V" ;;') == ["ephemera"]
    assert named_distributions(" -q 'ephemera-gpu[aws]'") == ["ephemera-gpu"]
    assert named_distributions(' "$GITHUB_ACTION_PATH/../../..[aws]"') == []
    assert named_distributions(" -q -e '.[all,test]' 2>&1") == []
    assert named_distributions(" --quiet pytest requests") == ["pytest", "requests"]
    assert named_distributions(" -r requirements.txt Ephemera_GPU") == ["ephemera-gpu"]
