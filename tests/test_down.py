"""`ephemera down` over many runs: bad state files are skipped with a warning, a run
that fails does not stop the others, a run whose ephemera is still going is left to
it, and every teardown it finishes lands in the history with its end time. Real
processes on this machine through the local provider; `reap` over damaged runs."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from ephemera.cli import cli
from ephemera.lifecycle.state import RunState, load_state, runs_dir, save_state
from ephemera.provider import make_labels
from ephemera.results import history
from ephemera.results.cost import PhaseTiming, compute_cost
from ephemera.results.history import RunRecord, record_run
from ephemera.spec.settings import get_settings
from tests.fixtures.common import process_alive, wait_process_gone

GONE_OWNER = {"pid": os.getpid(), "pid_start": "another-boot:1"}   # a process that ended


def _down(*args: str):
    outcome = CliRunner().invoke(cli, ["down", *args, "--json"])
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), \
        (outcome.output, outcome.exception)
    return outcome.exit_code, json.loads(outcome.stdout)


def _local_run(contract_local, run_id: str, *, owner: dict | None = GONE_OWNER,
               expires_in: float = 600, data: dict | None = None) -> tuple[RunState, int]:
    """A launched local run with a server process and its state file, as a run of an
    ephemera process (``owner``) would leave it."""
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec(run_id, expires_in_seconds=expires_in))
    if data:
        instance = replace(instance, data={**instance.data, **data})
    pgid = int(provider.connect(instance).start("sleep 300", log_file="server.log"))
    expires = datetime.now(UTC) + timedelta(seconds=expires_in)
    state = RunState(run_id=run_id, job="contract", provider="local",
                     labels=make_labels(run_id, "contract", "tester", expires),
                     expires_at=expires, status="active", instance=instance)
    if owner is not None:
        state.pid, state.pid_start = owner["pid"], owner["pid_start"]
    save_state(get_settings().state_dir, state)
    assert process_alive(pgid)
    return state, pgid


def _write_raw(name: str, text: str) -> None:
    directory = runs_dir(get_settings().state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(text)


def _valid_raw(run_id: str) -> dict:
    """A state file's content, as an older ephemera wrote it (no owner process)."""
    expires = datetime.now(UTC) + timedelta(minutes=5)
    return {"run_id": run_id, "job": "j", "provider": "local", "status": "launching",
            "labels": make_labels(run_id, "j", "t", expires),
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "instance": None}


# ---- bad files and failing runs -----------------------------------------------------

@pytest.mark.timeout(120)
def test_down_all_skips_bad_state_files_and_tears_down_the_rest(contract_local):
    unknown_key = _valid_raw("b-unknown-key")
    unknown_key["instance"] = {"provider": "local", "id": "local-x", "run_id": "b-unknown-key",
                               "state": "ready", "endpoint": {"host": "h", "colour": "red"}}
    unknown_key["added_later"] = {"x": 1}                   # kept, not a problem
    wrong_type = _valid_raw("b-wrong-type")
    wrong_type["labels"] = ["run-id"]
    _write_raw("a-null", "null")
    _write_raw("a-list", "[1, 2]")
    _write_raw("a-half", '{"run_id": "a-half", "prov')
    _write_raw("b-wrong-type", json.dumps(wrong_type))
    _write_raw("b-unknown-key", json.dumps(unknown_key))
    state, pgid = _local_run(contract_local, "c-good-run")

    code, out = _down("--all")
    assert code == 5                                       # something could not be read
    runs = {r["run_id"]: r for r in out["runs"]}
    assert runs["c-good-run"]["verified"] is True
    assert wait_process_gone(pgid, 5) and not Path(state.instance.workdir).exists()
    assert runs["b-unknown-key"]["verified"] is True       # unknown keys are not an error
    assert len(out["unreadable"]) == 4
    joined = "\n".join(out["unreadable"])
    for name in ("a-null", "a-list", "a-half", "b-wrong-type"):
        assert f"{name}.json" in joined
    assert "field 'labels'" in joined
    assert load_state(get_settings().state_dir, "c-good-run").status == "terminated"


@pytest.mark.timeout(120)
def test_down_all_goes_on_past_a_run_that_fails(contract_local):
    broken = _valid_raw("a-no-such-provider")
    broken["provider"] = "no-such-provider"
    _write_raw("a-no-such-provider", json.dumps(broken))
    state, pgid = _local_run(contract_local, "b-good-run")

    code, out = _down("--all")
    runs = {r["run_id"]: r for r in out["runs"]}
    assert runs["b-good-run"]["verified"] is True
    assert wait_process_gone(pgid, 5)
    assert runs["a-no-such-provider"]["verified"] is False
    assert "no-such-provider" in " ".join(runs["a-no-such-provider"]["problems"])
    assert code == 5


def test_down_of_an_unknown_run_still_tears_down_the_named_ones(contract_local):
    state, pgid = _local_run(contract_local, "named-run")
    code, out = _down("no-such-run", "named-run")
    assert code == 2 and out["unknown"] == ["no-such-run"]
    assert out["runs"][0]["verified"] is True and wait_process_gone(pgid, 5)


# ---- a run that is still going --------------------------------------------------------

@pytest.mark.timeout(120)
def test_down_all_leaves_a_run_whose_ephemera_is_still_running(contract_local):
    # Owned by this very process (its pid and start time): alive.
    state, pgid = _local_run(contract_local, "alive-run", owner=None)
    code, out = _down("--all")
    assert code == 0
    assert "still running" in out["runs"][0]["skipped"]
    assert process_alive(pgid) and Path(state.instance.workdir).is_dir()

    code, out = _down("--all", "--force")
    assert code == 0 and out["runs"][0]["verified"] is True
    assert wait_process_gone(pgid, 5)


@pytest.mark.timeout(120)
def test_down_all_tears_down_an_expired_run_even_if_its_ephemera_lives(contract_local):
    state, pgid = _local_run(contract_local, "expired-run", owner=None, expires_in=1)
    time.sleep(1.5)
    code, out = _down("--all")
    assert code == 0 and out["runs"][0]["verified"] is True
    assert wait_process_gone(pgid, 5)


def test_a_recycled_pid_is_not_a_live_owner():
    from ephemera.lifecycle.state import owner_alive, process_start

    expires = datetime.now(UTC) + timedelta(minutes=5)
    raw = RunState(run_id="r", job="j", provider="local", labels={}, expires_at=expires)
    assert owner_alive(RunState.from_dict(raw.to_dict()))                      # written by this process, just now
    assert raw.pid == os.getpid() and raw.pid_start == process_start(os.getpid())
    assert not owner_alive(replace(raw, pid_start="other-boot:42"))
    assert not owner_alive(replace(raw, host="another-machine"))
    assert not owner_alive(replace(raw, pid=None))


# ---- the history ----------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_down_adds_the_history_row_of_a_run_that_never_reported(contract_local):
    state, _ = _local_run(contract_local, "killed-run",
                          data={"price_per_hour": "3.6", "market": "spot"})
    before = datetime.now(UTC)
    code, out = _down("killed-run")
    after = datetime.now(UTC)
    assert code == 0 and out["runs"][0]["verified"] is True
    row = history.get_run("killed-run")
    assert row is not None, "a run that launched something has no history row"
    assert row["status"] == "unfinished" and row["termination_verified"] == 1
    assert before.timestamp() <= row["ended_at"] <= after.timestamp()
    launched = state.instance.launched_at.timestamp()
    assert row["launched_at"] == launched and row["price_per_hour"] == 3.6 and row["spot"] == 1
    assert row["billed_seconds"] >= row["ended_at"] - launched
    assert row["cost_usd"] == pytest.approx(row["billed_seconds"] * 3.6 / 3600)


@pytest.mark.timeout(120)
def test_down_completes_the_row_of_a_run_whose_teardown_was_not_verified(contract_local):
    state, _ = _local_run(contract_local, "unverified-run")
    launched = datetime.now(UTC) - timedelta(seconds=100)
    report = compute_cost(
        run_id="unverified-run", job="contract", tier=None, model="m", provider="local",
        instance_type="local-cpu", region=None, spot=False, price_per_hour=36.0,
        price_source="test", launched_at=launched, terminated_at=None,
        phases=[PhaseTiming("suite", launched, launched + timedelta(seconds=10))],
        status="passed", exit_code=5)
    record_run(RunRecord.from_report(report))
    row = history.get_run("unverified-run")
    assert row["ended_at"] is None and row["termination_verified"] == 0
    assert row["billed_seconds"] == 10

    code, _ = _down("unverified-run")
    assert code == 0
    row = history.get_run("unverified-run")
    assert row["termination_verified"] == 1 and row["status"] == "passed"
    assert row["ended_at"] - launched.timestamp() >= 100
    assert row["billed_seconds"] >= 100
    assert row["cost_usd"] == pytest.approx(row["billed_seconds"] * 36.0 / 3600)


# ---- reap ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_reap_goes_on_past_damaged_run_directories(contract_local):
    provider = contract_local.provider
    expired = provider.launch(contract_local.make_spec("reap-expired", expires_in_seconds=3))
    watchdog = int(expired.data["watchdog_pid"])    # gone too (say, the machine rebooted)
    os.kill(watchdog, signal.SIGKILL)
    assert wait_process_gone(watchdog, 5)
    for name, text in (("reap-list", "[]"), ("reap-types", '{"id": 1, "run_id": []}'),
                       ("reap-time", '{"id": "x", "run_id": "reap-time", "launched_at": "no"}')):
        directory = provider.root / name
        directory.mkdir(parents=True)
        (directory / "labels.json").write_text(text)
    time.sleep(3.5)
    outcome = CliRunner().invoke(cli, ["reap", "--provider", "local", "--json", "--all-owners"])
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    report = json.loads(outcome.stdout)
    assert [i["run_id"] for i in report["expired"]] == ["reap-expired"]
    assert report["expired"][0]["verified"] is True and report["skipped"] == []
    assert not Path(expired.workdir).exists()
