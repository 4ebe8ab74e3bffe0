"""Teardown never depends on the disk: the terminate goes out first, and a state file
that cannot be written (full disk, read-only directory) is a warning, not a leak.
Real processes on this machine through the local provider."""

from __future__ import annotations

import errno
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from ephemera_providers.local import LocalProvider

from ephemera import state as state_module
from ephemera.cli import cli
from ephemera.provider import make_labels
from ephemera.state import RunState, load_state, save_state
from ephemera.teardown import teardown_run
from tests.fixtures.common import process_alive, wait_process_gone


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _launch(contract_local, run_id: str):
    """A local run with a real server process; returns (provider, instance, pgid)."""
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec(run_id))
    pgid = int(provider.connect(instance).start("sleep 300", log_file="server.log"))
    assert process_alive(pgid)
    return provider, instance, pgid


class _Recording(LocalProvider):
    """The local provider, noting the order of the calls teardown makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def terminate(self, instance):
        self.calls.append("terminate")
        return super().terminate(instance)

    def find(self, labels):
        self.calls.append("find")
        return super().find(labels)

    def poll(self, instance):
        self.calls.append("poll")
        return super().poll(instance)


@pytest.mark.timeout(60)
def test_the_known_instance_is_terminated_before_anything_else(contract_local):
    provider = _Recording()
    instance = provider.launch(contract_local.make_spec("td-order-1"))
    result = teardown_run(provider, "td-order-1", instance, timeout=30, log=lambda m: None)
    assert result.verified
    assert provider.calls[0] == "terminate", provider.calls
    assert not Path(instance.workdir).exists()


@pytest.mark.timeout(60)
def test_a_state_write_that_fails_does_not_stop_the_teardown(contract_local):
    provider, instance, pgid = _launch(contract_local, "td-disk-1")
    seen: list[str] = []
    logged: list[str] = []

    def record(status: str) -> None:
        seen.append(status)
        _disk_full()

    result = teardown_run(provider, "td-disk-1", instance, timeout=30, log=logged.append,
                          record=record)
    assert wait_process_gone(pgid, 5), "the run's process survived a teardown"
    assert not Path(instance.workdir).exists()
    assert result.verified and result.terminated == [instance.id]
    assert seen == ["terminated"]
    assert any("No space left on device" in w for w in result.warnings)
    assert any("could not record" in line for line in logged)


@pytest.mark.timeout(60)
def test_down_finishes_the_teardown_when_the_state_file_cannot_be_written(contract_local,
                                                                          monkeypatch):
    provider, instance, pgid = _launch(contract_local, "td-disk-2")
    settings_dir = Path(instance.workdir).parent.parent     # <state_dir>/local/<run>
    expires = datetime.now(UTC) + timedelta(minutes=10)
    run = RunState(run_id="td-disk-2", job="contract", provider="local",
                   labels=make_labels("td-disk-2", "contract", "tester", expires),
                   expires_at=expires, status="active", instance=instance)
    save_state(settings_dir, run)
    monkeypatch.setattr(state_module, "save_state", _disk_full)

    outcome = CliRunner().invoke(cli, ["down", "td-disk-2", "--json"])
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    report = json.loads(outcome.stdout)["runs"][0]
    assert report["verified"] is True
    assert any("No space left on device" in w for w in report["warnings"])
    assert wait_process_gone(pgid, 5) and not Path(instance.workdir).exists()
    # The file still says "active": a later `down` checks again and finds nothing.
    assert load_state(settings_dir, "td-disk-2").status == "active"
