"""Shared test setup. Fixtures for the real components live in tests/fixtures/,
one module per component, and are loaded here as plugins."""

import os

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tests.runlib import known_hosts_file

# Property-based tests of the input readers (tests/test_hostile_*.py). "ci" is the
# default: a fixed, modest budget and the same examples every run. "long"
# (HYPOTHESIS_PROFILE=long, as benchmarks/bench_fuzz.py runs it) tries many more,
# EPHEMERA_FUZZ_EXAMPLES per property. The readers' own time bound replaces
# hypothesis's per-example deadline, which is too tight for a busy CI machine.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
hypothesis_settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, database=None,
    suppress_health_check=_QUIET, print_blob=True)
hypothesis_settings.register_profile(
    "long", max_examples=int(os.environ.get("EPHEMERA_FUZZ_EXAMPLES", "2000")),
    deadline=None, database=None, suppress_health_check=_QUIET, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.sshd",
    "tests.fixtures.docker_engine",
    "tests.fixtures.moto_server",
    "tests.fixtures.cpu_env",
    "tests.fixtures.standin_targets",
    "tests.fixtures.slurm",
    "tests.fixtures.plugin",
    "tests.fixtures.loopback_hub",
]


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch, tmp_path_factory):
    """Every test gets its own state/data dirs; the cache dir (CPU env, tiny model,
    images) stays shared because building it is slow and it is safe to share."""
    from ephemera.spec.settings import reset_settings

    monkeypatch.setenv("EPHEMERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EPHEMERA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EPHEMERA_ARTIFACTS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("EPHEMERA_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("EPHEMERA_SSH_KNOWN_HOSTS", str(known_hosts_file(tmp_path_factory)))
    if "EPHEMERA_CACHE_DIR" in os.environ:
        monkeypatch.setenv("EPHEMERA_CACHE_DIR", os.environ["EPHEMERA_CACHE_DIR"])
    reset_settings()
    yield
    reset_settings()
