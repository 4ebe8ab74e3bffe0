"""`ephemera reap` acts on the caller's own runs unless told otherwise: an expired run
of another owner is left alone and counted; --all-owners (or --owner) widens it.
Real processes on this machine through the local provider, the CLI through click."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from ephemera.cli import cli
from ephemera.provider import make_labels
from ephemera.spec.settings import reset_settings
from tests.fixtures.common import process_alive, wait_process_gone

pytestmark = pytest.mark.timeout(120)

ME, OTHER = "me-reaper", "someone-else"


@pytest.fixture
def as_me(monkeypatch):
    monkeypatch.setenv("EPHEMERA_OWNER", ME)
    reset_settings()


def _expired_run(contract_local, run_id: str, owner: str):
    """A live local run (server process and watchdog running) whose labels say it
    expired five minutes ago and belongs to ``owner``; returns (instance, pgid)."""
    spec = contract_local.make_spec(run_id)
    past = datetime.now(UTC) - timedelta(minutes=5)
    spec = type(spec)(**{**spec.__dict__, "labels": make_labels(run_id, "contract", owner, past)})
    instance = contract_local.provider.launch(spec)
    pgid = int(contract_local.provider.connect(instance).start("sleep 300", log_file="server.log"))
    assert process_alive(pgid)
    return instance, pgid


def _reap(*args: str) -> tuple[dict, str]:
    outcome = CliRunner().invoke(cli, ["reap", "--provider", "local", "--json", *args])
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    return json.loads(outcome.stdout), outcome.stderr


@pytest.fixture
def two_runs(contract_local):
    mine = _expired_run(contract_local, "reap-mine", ME)
    theirs = _expired_run(contract_local, "reap-theirs", OTHER)
    yield mine, theirs
    for instance, _pgid in (mine, theirs):
        contract_local.provider.terminate(instance)


def test_default_reaps_only_my_expired_run_and_counts_the_other(as_me, two_runs):
    (mine, my_pgid), (theirs, their_pgid) = two_runs
    report, _ = _reap()
    assert [i["run_id"] for i in report["expired"]] == ["reap-mine"]
    assert report["expired"][0]["verified"] is True and report["expired"][0]["owner"] == ME
    assert report["owner"] == ME and report["foreign_owner_skipped"] == 1
    assert wait_process_gone(my_pgid, 10) and not Path(mine.workdir).exists()
    assert process_alive(their_pgid) and Path(theirs.workdir).exists()


def test_all_owners_reaps_the_other_owners_expired_run(as_me, two_runs):
    (mine, my_pgid), (theirs, their_pgid) = two_runs
    report, _ = _reap("--all-owners")
    assert sorted(i["run_id"] for i in report["expired"]) == ["reap-mine", "reap-theirs"]
    assert all(i["verified"] for i in report["expired"])
    assert report["owner"] is None and report["foreign_owner_skipped"] == 0
    for pgid in (my_pgid, their_pgid):
        assert wait_process_gone(pgid, 10)
    assert not Path(theirs.workdir).exists()


def test_owner_option_picks_another_owner(as_me, two_runs):
    (mine, my_pgid), (theirs, their_pgid) = two_runs
    report, _ = _reap("--owner", OTHER)
    assert [i["run_id"] for i in report["expired"]] == ["reap-theirs"]
    assert report["owner"] == OTHER and report["foreign_owner_skipped"] == 1
    assert wait_process_gone(their_pgid, 10)
    assert process_alive(my_pgid) and Path(mine.workdir).exists()


def test_text_output_says_how_many_of_other_owners_were_left_alone(as_me, two_runs):
    (_mine, _), (theirs, their_pgid) = two_runs
    outcome = CliRunner().invoke(cli, ["reap", "--provider", "local", "--dry-run"])
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    assert "would terminate: local" in outcome.stdout and "run reap-mine" in outcome.stdout
    assert "reap-theirs" not in outcome.stdout
    assert f"1 resource(s) of other owners than '{ME}' left alone" in outcome.stderr
    assert "--all-owners" in outcome.stderr
    assert process_alive(their_pgid)


def test_a_not_expired_run_of_mine_is_kept_not_counted_as_foreign(as_me, contract_local):
    spec = contract_local.make_spec("reap-fresh")
    future = datetime.now(UTC) + timedelta(hours=1)
    spec = type(spec)(**{**spec.__dict__, "labels": make_labels("reap-fresh", "contract", ME,
                                                                 future)})
    instance = contract_local.provider.launch(spec)
    try:
        report, _ = _reap()
        assert report["expired"] == [] and report["kept"] == 1
        assert report["foreign_owner_skipped"] == 0
        assert Path(instance.workdir).exists()
    finally:
        contract_local.provider.terminate(instance)


def test_owner_and_all_owners_together_are_refused(as_me):
    outcome = CliRunner().invoke(cli, ["reap", "--provider", "local", "--owner", OTHER,
                                       "--all-owners"])
    assert outcome.exit_code == 2
    assert "--owner and --all-owners" in outcome.output


def test_an_empty_owner_is_refused(as_me):
    outcome = CliRunner().invoke(cli, ["reap", "--provider", "local", "--owner", " "])
    assert outcome.exit_code == 2 and "--owner" in outcome.output
