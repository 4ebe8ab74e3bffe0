"""Shared test setup. Fixtures for the real components live in tests/fixtures/,
one module per component, and are loaded here as plugins."""

import os

import pytest

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.sshd",
    "tests.fixtures.docker_engine",
    "tests.fixtures.moto_server",
    "tests.fixtures.cpu_env",
    "tests.fixtures.standin_targets",
]


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """Every test gets its own state/data dirs; the cache dir (CPU env, tiny model,
    images) stays shared because building it is slow and it is safe to share."""
    from ephemera.settings import reset_settings

    monkeypatch.setenv("EPHEMERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EPHEMERA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EPHEMERA_ARTIFACTS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("EPHEMERA_CONFIG", str(tmp_path / "no-config.toml"))
    if "EPHEMERA_CACHE_DIR" in os.environ:
        monkeypatch.setenv("EPHEMERA_CACHE_DIR", os.environ["EPHEMERA_CACHE_DIR"])
    reset_settings()
    yield
    reset_settings()
