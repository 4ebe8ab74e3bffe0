"""The provider contract, checked the same way for every built-in provider.

Each provider's fixture module defines ``contract_<name>``: an object with
``.provider`` and ``.make_spec(run_id, expires_in_seconds=600)``. A provider whose
fixture is missing fails here on purpose: every built-in must be covered.
"""

from __future__ import annotations

import time
import uuid

import pytest

from ephemera.provider import LABEL_KEYS, Instance, InstanceState, Provider

# dirhost: the plugin of tests/plugins, outside ephemera's packages.
PROVIDERS = ["local", "ssh", "docker", "aws", "dirhost"]


@pytest.fixture(params=PROVIDERS)
def contract(request):
    name = request.param
    try:
        return request.getfixturevalue(f"contract_{name}")
    except pytest.FixtureLookupError:
        pytest.fail(f"no contract fixture 'contract_{name}': the {name} provider's fixture "
                    "module must define it")


def _run_id() -> str:
    return f"ct-{uuid.uuid4().hex[:10]}"


def _poll_until(provider, instance: Instance, states: set[InstanceState], seconds: float) -> Instance:
    deadline = time.monotonic() + seconds
    while True:
        instance = provider.poll(instance)
        if instance.state in states or time.monotonic() > deadline:
            return instance
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_lifecycle_contract(contract):
    provider = contract.provider
    assert isinstance(provider, Provider)
    run_id = _run_id()
    spec = contract.make_spec(run_id)
    first = provider.launch(spec)
    try:
        again = provider.launch(spec)
        assert again.id == first.id, "launch must be idempotent on the run id"
        assert first.run_id == run_id

        ready = _poll_until(provider, first, {InstanceState.READY, InstanceState.FAILED}, 480)
        assert ready.state == InstanceState.READY, ready.message

        for key in LABEL_KEYS:
            assert ready.labels.get(key) == spec.labels[key], f"label {key} did not round-trip"

        found = provider.find({"run-id": run_id})
        assert [i.id for i in found] == [first.id]
        assert all(found[0].labels.get(k) == spec.labels[k] for k in LABEL_KEYS)
        assert provider.find({"run-id": run_id, "job": "some-other-job"}) == []
    finally:
        provider.terminate(first)
    provider.terminate(first)  # twice is fine
    assert provider.find({"run-id": run_id}) == []
    gone = _poll_until(provider, first, {InstanceState.TERMINATED}, 120)
    assert gone.state == InstanceState.TERMINATED


@pytest.mark.timeout(300)
def test_terminate_of_an_unknown_instance_succeeds(contract):
    provider = contract.provider
    run_id = _run_id()
    # An id that is well-formed for the provider but names nothing.
    ids = {"aws": "i-0" + uuid.uuid4().hex[:16], "docker": uuid.uuid4().hex * 2}
    unknown = Instance(provider=provider.name, id=ids.get(provider.name, f"unknown-{run_id}"),
                       run_id=run_id, state=InstanceState.RUNNING)
    provider.terminate(unknown)
    assert provider.find({"run-id": run_id}) == []


def _providers_json(env: dict[str, str]) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ephemera", "providers", "--json"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return {row["name"]: row for row in json.loads(out.stdout)["providers"]}


@pytest.mark.timeout(120)
def test_providers_command_lists_builtins_and_reports_a_broken_plugin(tmp_path):
    """A third-party plugin whose module cannot be imported is listed as unusable,
    with the reason, and the command still succeeds."""
    import os

    dist = tmp_path / "site" / "ephemera_broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ephemera-broken-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ephemera.providers]\nbroken = ephemera_missing_sdk_module:Provider\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    rows = _providers_json(env)
    assert {"local", "ssh", "docker", "aws"} <= set(rows)
    assert rows["local"]["usable"] is True
    assert rows["local"]["target"] == "ephemera_providers.local:LocalProvider"
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    assert rows["ssh"]["distribution"] == tomllib.loads(pyproject.read_text())["project"]["name"]
    broken = rows["broken"]
    assert broken["usable"] is False and broken["distribution"] == "ephemera-broken-plugin"
    assert "ephemera_missing_sdk_module" in broken["detail"]
