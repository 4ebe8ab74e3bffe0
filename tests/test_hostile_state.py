"""Run state files and the history database on hostile input: every reader ends in a
valid value or ephemera's typed error (ConfigError for a state file, InfraError for
the history) within the time and memory bounds of tests/hostile.py, and `down --all`
over a directory of such files never crashes nor touches what is not a run's.

First the cases found by hand, then properties over generated input: random JSON
documents, valid files with one field replaced or removed, unknown keys, raw bytes,
mutated text; SQLite files with flipped bytes, truncated, or with rows of the wrong
types.
"""

from __future__ import annotations

import json
import random
import sqlite3
import tempfile
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import assume, given
from hypothesis import strategies as st

from ephemera.cli import cli
from ephemera.errors import ConfigError, EphemeraError, InfraError
from ephemera.lifecycle.state import (
    MAX_STATE_BYTES,
    RunState,
    read_state_file,
    read_states,
    save_state,
)
from ephemera.results import history
from ephemera.results.history import GroupRow, RunRecord, record_run
from tests.hostile import bounded

WORKDIR = Path(tempfile.mkdtemp(prefix="ephemera-hostile-state-"))
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _valid() -> dict:
    expires = NOW + timedelta(hours=1)
    return {
        "run_id": "hostile-run", "job": "j", "provider": "local",
        "labels": {"run-id": "hostile-run", "job": "j", "owner": "o",
                   "expires-at": "2026-11-21T13:00:00Z"},
        "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "status": "active",
        "instance": {"provider": "local", "id": "local-hostile-run", "run_id": "hostile-run",
                     "state": "ready", "labels": {"run-id": "hostile-run"},
                     "instance_type": "local-cpu", "region": None,
                     "endpoint": {"host": "127.0.0.1", "port": 22, "user": "u"},
                     "workdir": "/nonexistent/hostile-run", "launched_at": "2026-11-21T12:00:00Z",
                     "message": "", "data": {"workdir": "/nonexistent/hostile-run"}},
        "ssh_key_path": None, "artifacts_dir": None, "provider_options": {"x": [1]},
        "updated_at": "2026-11-21T12:00:01Z", "pid": None, "pid_start": None, "host": None,
    }


def _read(content: bytes | str, name: str = "hostile-run"):
    path = WORKDIR / "runs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    outcome = bounded(lambda: read_state_file(path), (ConfigError,))
    if outcome.error is None:
        _check_state(outcome.value)
    else:
        assert str(path) in outcome.error.message
    return outcome


def _check_state(state: RunState) -> None:
    """A state that was accepted is usable: right types, and it saves and reads back."""
    assert isinstance(state.run_id, str) and isinstance(state.provider, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in state.labels.items())
    assert state.expires_at.tzinfo is not None
    if state.instance is not None:
        assert isinstance(state.instance.id, str)
        assert all(isinstance(v, str) for v in state.instance.data.values())
    directory = Path(tempfile.mkdtemp(dir=WORKDIR))
    save_state(directory, state)
    again = read_state_file(directory / "runs" / f"{state.run_id}.json")
    assert again.to_dict() | {"updated_at": None} == state.to_dict() | {"updated_at": None}


# ---- state files: cases found by hand ------------------------------------------------

@pytest.mark.parametrize("content, field", [
    ("null", "found null"),
    ("[1, 2]", "found a list"),
    ('"text"', "found a string"),
    ("1" + "0" * 5000, "not a usable JSON"),
    ("[" * 100_000, "not"),
    ("1e999", "found a number"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ('{"run_id": "hostile-run", "prov', "not valid JSON (line 1"),
    (json.dumps({**_valid(), "labels": ["run-id"]}), "field 'labels'"),
    (json.dumps({**_valid(), "pid": True}), "field 'pid'"),
    (json.dumps({**_valid(), "pid": 10**40}), "field 'pid'"),
    (json.dumps({**_valid(), "expires_at": "0001-01-01T00:00:00+01:00"}), "field 'expires_at'"),
    (json.dumps({**_valid(), "expires_at": 1e308}), "field 'expires_at'"),
    (json.dumps({**_valid(), "run_id": "another-run"}), "does not match"),
    (json.dumps({**_valid(), "instance": {**_valid()["instance"], "state": "exploded"}}),
     "field 'instance.state'"),
    (json.dumps({**_valid(), "instance": {**_valid()["instance"], "data": {"a": 1}}}),
     "field 'instance.data.a'"),
    (json.dumps({**_valid(), "instance": {**_valid()["instance"], "endpoint": {"port": 0}}}),
     "field 'instance.endpoint.host'"),
])
def test_bad_state_files_are_refused_by_name(content, field):
    outcome = _read(content)
    assert outcome.error is not None and field in outcome.error.message, outcome.error


def test_a_file_over_the_size_limit_is_refused_without_reading_it_all():
    outcome = _read(b" " * (MAX_STATE_BYTES + 10) + b"{}")
    assert "larger than" in outcome.error.message


def test_unknown_keys_are_kept_and_written_back():
    raw = _valid()
    raw["added_by_a_newer_version"] = {"regions": ["eu-west-1"]}
    raw["instance"]["endpoint"]["colour"] = "red"
    outcome = _read(json.dumps(raw))
    assert outcome.error is None
    assert outcome.value.extra == {"added_by_a_newer_version": {"regions": ["eu-west-1"]}}
    assert outcome.value.to_dict()["added_by_a_newer_version"] == {"regions": ["eu-west-1"]}


# ---- state files: properties ---------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63)
    | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30)
FIELDS = list(_valid()) + ["instance." + k for k in _valid()["instance"]] + [
    "instance.endpoint." + k for k in ("host", "port", "user", "key_path")]


def _replace(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            return raw
        node = node[part]
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


_DELETE = object()


@given(JSON)
def test_any_json_document_is_a_state_or_a_config_error(document):
    _read(json.dumps(document))


@given(st.lists(st.tuples(st.sampled_from(FIELDS), JSON | st.just(_DELETE)), min_size=1,
                max_size=3),
       st.dictionaries(st.text(min_size=1, max_size=8), JSON, max_size=3))
def test_a_valid_file_with_fields_replaced_removed_or_added(changes, unknown):
    raw = _valid()
    for dotted, value in changes:
        raw = _replace(raw, dotted, value)
    raw = {**unknown, **raw}
    _read(json.dumps(raw))


@given(st.binary(max_size=2000))
def test_any_bytes_are_a_state_or_a_config_error(content):
    _read(content)


@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8),
       st.booleans())
def test_a_damaged_valid_file_is_a_state_or_a_config_error(offset, junk, truncate):
    text = json.dumps(_valid(), indent=2).encode()
    at = offset % len(text)
    _read(text[:at] if truncate else text[:at] + junk + text[at + len(junk):])


@given(st.lists(JSON | st.binary(max_size=200).map(bytes.hex), max_size=6))
def test_reading_a_directory_of_hostile_files_never_stops_early(documents):
    directory = Path(tempfile.mkdtemp(dir=WORKDIR))
    runs = directory / "runs"
    runs.mkdir()
    for index, document in enumerate(documents):
        (runs / f"r{index}.json").write_text(json.dumps(document))
    outcome = bounded(lambda: read_states(directory), ())
    states, problems = outcome.value
    assert len(states) + len(problems) == len(documents)


# ---- down --all over hostile files ---------------------------------------------------

def test_down_all_never_removes_a_directory_a_state_file_points_at(tmp_path):
    """The local provider only removes the working directory it made for the run."""
    victim = tmp_path / "precious" / "hostile-run"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    raw = _valid()
    raw["instance"]["workdir"] = raw["instance"]["data"]["workdir"] = str(victim)
    from ephemera.spec.settings import get_settings

    runs = get_settings().state_dir / "runs"
    runs.mkdir(parents=True)
    (runs / "hostile-run.json").write_text(json.dumps(raw))
    outcome = bounded(lambda: CliRunner().invoke(cli, ["down", "--all", "--json"]), (),
                      seconds=30)
    result = outcome.value
    assert result.exit_code == 5, (result.output, result.exception)
    (run,) = json.loads(result.stdout)["runs"]
    assert run["verified"] is False and "not touching it" in " ".join(run["problems"])
    assert (victim / "keep.txt").read_text() == "mine"


@given(st.lists(JSON, min_size=1, max_size=4))
def test_down_all_over_hostile_files_finishes_with_a_verdict(documents):
    from ephemera.spec.settings import get_settings

    runs = get_settings().state_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in runs.glob("*.json"):
        old.unlink()
    for index, document in enumerate(documents):
        if isinstance(document, dict):   # make some of them look like real state files
            document = {**_valid(), **document, "run_id": f"h{index}"}
            if document.get("provider") in ("aws", "docker", "ssh"):
                document["provider"] = "local"    # no cloud or engine calls from here
        (runs / f"h{index}.json").write_text(json.dumps(document))
    outcome = bounded(lambda: CliRunner().invoke(cli, ["down", "--all", "--json"]), (),
                      seconds=30)
    result = outcome.value
    assert result.exit_code in (0, 5), (result.output, result.exception)
    out = json.loads(result.stdout)
    assert len(out["runs"]) + len(out["unreadable"]) <= len(documents)


# ---- the history database ------------------------------------------------------------

def _history(rows: int = 5) -> Path:
    path = Path(tempfile.mkdtemp(dir=WORKDIR)) / "history.sqlite3"
    for i in range(rows):
        record_run(RunRecord(
            run_id=f"run-{i}", job=f"job-{i % 2}", tier="smoke", model="m", provider="local",
            instance_type="cpu", region=None, status="passed" if i % 2 else "failed",
            exit_code=i % 2, started_at=NOW - timedelta(hours=i), duration_seconds=10.0 + i,
            cost_usd=0.1 * i, phases={"suite": 1.0}), path=path)
    with closing(sqlite3.connect(path)) as conn:   # back to one file, so damage hits rows
        conn.execute("PRAGMA journal_mode = DELETE")
    return path


def _read_history(path: Path) -> None:
    """Every reader (and a writer) on the file: a valid answer or InfraError/ConfigError."""
    errors = (InfraError, ConfigError)
    groups = bounded(lambda: history.summarize(None, "job", path=path, now=NOW.timestamp()),
                     errors)
    if groups.error is None:
        assert all(isinstance(g, GroupRow) and g.runs >= 0 and isinstance(g.cost_usd, float)
                   for g in groups.value)
    row = bounded(lambda: history.get_run("run-1", path=path), errors)
    if row.error is None and row.value is not None:
        assert row.value["run_id"] == "run-1"
    count = bounded(lambda: history.count_runs(path=path), errors)
    if count.error is None:
        assert isinstance(count.value, int) and count.value >= 0
    bounded(lambda: record_run(RunRecord(
        run_id="new", job="j", tier=None, model="m", provider="local", instance_type="cpu",
        region=None, status="passed", exit_code=0, started_at=NOW, duration_seconds=1.0,
        cost_usd=0.0, phases={}), path=path), errors)
    for outcome in (groups, row, count):
        if outcome.error is not None:
            assert isinstance(outcome.error, EphemeraError) and str(path) in str(outcome.error)


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=2**20),
                          st.binary(min_size=1, max_size=16)), min_size=1, max_size=8))
def test_a_history_file_with_damaged_bytes(damage):
    path = _history()
    data = bytearray(path.read_bytes())
    for offset, junk in damage:
        at = offset % len(data)
        data[at:at + len(junk)] = junk
    path.write_bytes(bytes(data[:len(path.read_bytes())]))
    _read_history(path)


@given(st.integers(min_value=0, max_value=2**16))
def test_a_truncated_history_file(length):
    path = _history()
    data = path.read_bytes()
    path.write_bytes(data[:length % (len(data) + 1)])
    _read_history(path)


SQL_VALUES = (st.none() | st.integers(min_value=-2**63, max_value=2**63 - 1)
              | st.floats() | st.text(max_size=20) | st.binary(max_size=20))


@given(st.sampled_from(["phases", "cost_usd", "started_at", "status", "job", "duration_seconds",
                        "billed_seconds", "spot", "exit_code", "launched_at", "ended_at"]),
       SQL_VALUES)
def test_history_rows_holding_values_of_the_wrong_type(column, value):
    path = _history()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        try:
            conn.execute(f"UPDATE runs SET {column} = ?", (value,))
        except sqlite3.IntegrityError:
            assume(False)   # a NOT NULL column: SQLite itself refuses the damage
    _read_history(path)


@pytest.mark.parametrize("statement", [
    "PRAGMA user_version = 99",
    "PRAGMA user_version = -3",
    "DROP TABLE runs",
    "ALTER TABLE runs RENAME TO other",
    "UPDATE runs SET phases = '" + "[" * 5000 + "'",
])
def test_history_files_with_a_foreign_schema(statement):
    path = _history()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(statement)
    _read_history(path)


def test_history_path_that_is_not_a_database():
    for content in (b"", b"SQLite format 3\x00" + b"\xff" * 200, random.Random(1).randbytes(5000)):
        path = Path(tempfile.mkdtemp(dir=WORKDIR)) / "history.sqlite3"
        path.write_bytes(content)
        _read_history(path)
    directory = Path(tempfile.mkdtemp(dir=WORKDIR)) / "history.sqlite3"
    directory.mkdir()
    _read_history(directory)
