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

from ephemera.cli import cli
from ephemera.lifecycle import state as state_module
from ephemera.lifecycle.state import RunState, load_state, save_state
from ephemera.lifecycle.teardown import teardown_run
from ephemera.provider import make_labels
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


class _SearchFails(LocalProvider):
    """The local provider whose searches by label cannot look everywhere: ``first`` for
    the first search, ``later`` for the ones after it (None: searches work)."""

    def __init__(self, first: bool, later: bool) -> None:
        super().__init__()
        self.fail = [first, later]
        self.searches = 0

    def find(self, labels):
        from ephemera.errors import IncompleteSearchError

        found = super().find(labels)
        failing = self.fail[min(self.searches, 1)]
        self.searches += 1
        if failing:
            raise IncompleteSearchError(found, ["region-b: timed out"])
        return found


@pytest.mark.timeout(60)
def test_a_verification_that_could_not_look_everywhere_is_not_verified(contract_local):
    provider = _SearchFails(first=False, later=True)
    instance = provider.launch(contract_local.make_spec("td-blind-1"))
    result = teardown_run(provider, instance.run_id, instance, timeout=30, log=lambda m: None)
    assert not result.verified
    assert any("region-b" in p for p in result.problems)


@pytest.mark.timeout(60)
def test_what_an_incomplete_search_found_is_still_terminated(contract_local):
    provider = _SearchFails(first=True, later=False)
    instance = provider.launch(contract_local.make_spec("td-partial-1"))
    pgid = int(provider.connect(instance).start("sleep 300", log_file="server.log"))
    # No instance recorded (a launch whose reply was lost): only the search knows it.
    result = teardown_run(provider, instance.run_id, None, timeout=30, log=lambda m: None)
    assert wait_process_gone(pgid, 5), "the instance the search found was not terminated"
    assert result.terminated == [instance.id]
    assert not result.verified   # the search said it could not look everywhere


@pytest.mark.timeout(60)
def test_several_targets_end_in_parallel(contract_local):
    """Two instances of one run (a retried launch): both are waited on at once, so the
    teardown takes about as long as the slowest, not the sum."""
    import time

    class _SlowEnd(LocalProvider):
        def poll(self, instance):
            time.sleep(2.0)   # a machine that takes a while to report its end
            return super().poll(instance)

    provider = _SlowEnd()
    spec = contract_local.make_spec("td-two-1")
    first = provider.launch(spec)
    second = provider.launch(type(spec)(**{**spec.__dict__, "run_id": "td-two-2",
                                            "labels": {**spec.labels}}))
    started = time.monotonic()
    result = teardown_run(provider, "td-two-1", first, timeout=30, log=lambda m: None)
    took = time.monotonic() - started
    assert sorted(result.terminated) == sorted([first.id, second.id]), result
    assert took < 3.5, f"{took:.1f}s: the two instances were waited on one after the other"


@pytest.mark.timeout(60)
def test_reap_acts_on_what_an_incomplete_search_found_and_says_it_was_incomplete(contract_local,
                                                                                  monkeypatch):
    from ephemera import registry
    from ephemera.lifecycle.reaper import reap

    provider = _SearchFails(first=True, later=True)
    instance = provider.launch(contract_local.make_spec("td-reap-1", expires_in_seconds=1))
    pgid = int(provider.connect(instance).start("sleep 300", log_file="server.log"))
    monkeypatch.setattr(registry, "get_provider", lambda name: provider)
    report = reap(["local"], owner=None, dry_run=False, now=datetime.now(UTC) + timedelta(minutes=1),
                  log=lambda m: None)
    assert [item["id"] for item in report.expired] == [instance.id]
    assert wait_process_gone(pgid, 5)
    assert report.incomplete and "region-b" in report.incomplete[0]
