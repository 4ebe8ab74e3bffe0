"""Shared settings of the OpenAI-API suite: where the server is and what it serves."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: quick checks run on every pull request")
    config.addinivalue_line("markers", "load: concurrent load (set RUN_LOAD_TESTS=1)")


@pytest.fixture(scope="session")
def base_url() -> str:
    return os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")


@pytest.fixture(scope="session")
def model() -> str:
    return os.environ["SERVED_MODEL"]
