"""`ephemera validate` and `ephemera schema` through the real command line.

Every broken job file must give exit code 2 and a compiler-style message naming the
file, the line (and the field where there is one), and never a traceback. The broken
files live in tests/data/broken/; the first line of each says what is wrong and what
the message must name (``expect line=N field=PATH [tier=T] [context=N]``). Files that
cannot carry such a comment (empty, binary, a directory) are made by the tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BROKEN = Path(__file__).parent / "data" / "broken"
CASES = sorted(BROKEN.glob("*.yaml"))

GOOD_JOB = """\
name: smoke
model:
  id: org/model
  max_model_len: 2048
image: vllm/vllm-openai:v0.6.0
server:
  args: ["--enforce-eager"]
  port: 8123
suite:
  command: pytest -q
  timeout: 20m
resources:
  provider: docker
timeout: 1h30m
tiers:
  big:
    model:
      max_model_len: 8192
    server:
      args: ["--max-num-seqs", "8"]
    resources:
      spot: true
"""


def run_cli(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ephemera", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def expectations(path: Path) -> dict[str, str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "expect " in first, f"{path.name}: first line must say what to expect"
    return dict(token.split("=", 1) for token in first.split("expect ", 1)[1].split())


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert result.stdout == "", "errors go to stderr"


def test_there_are_at_least_25_broken_files():
    assert len(CASES) >= 25


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_broken_job_file(case: Path):
    expect = expectations(case)
    args = ["validate", case]
    if "tier" in expect:
        args += ["--tier", expect["tier"]]
    result = run_cli(*args)
    assert_clean_failure(result)
    err = result.stderr
    assert str(case) in err, err
    if expect["line"] == "none":
        assert not re.search(re.escape(str(case)) + r":\d", err), err
    else:
        # file:line: or file:line:col:
        assert re.search(re.escape(str(case)) + rf":{expect['line']}[:]", err), err
    if "field" in expect:
        assert re.search(rf"(^|\s|\] ){re.escape(expect['field'])}:", err, re.M), err
    if "context" in expect:
        assert f"started at line {expect['context']}" in err, err


def test_empty_file(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"")
    result = run_cli("validate", job)
    assert_clean_failure(result)
    assert f"{job}: the file is empty" in result.stderr


def test_directory_instead_of_file(tmp_path: Path):
    result = run_cli("validate", tmp_path)
    assert_clean_failure(result)
    assert f"{tmp_path}: is a directory" in result.stderr


def test_missing_file(tmp_path: Path):
    result = run_cli("validate", tmp_path / "nope.yaml")
    assert_clean_failure(result)
    assert "nope.yaml: no such file" in result.stderr


def test_binary_garbage_with_nul(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"name: x\nmodel:\n" + bytes(range(256)) * 8)
    result = run_cli("validate", job)
    assert_clean_failure(result)
    assert f"{job}:3:" in result.stderr and "binary" in result.stderr


def test_binary_garbage_without_nul(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"name: ok\n" + bytes(range(0x80, 0x100)) * 4)
    result = run_cli("validate", job)
    assert_clean_failure(result)
    assert f"{job}:2:" in result.stderr and "not UTF-8" in result.stderr


def test_utf16_file(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB, encoding="utf-16")
    result = run_cli("validate", job)
    assert_clean_failure(result)
    assert "UTF-16" in result.stderr


def test_several_yaml_documents(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB + "---\nname: other\n")
    result = run_cli("validate", job)
    assert_clean_failure(result)
    assert re.search(re.escape(str(job)) + r":\d+:\d+: YAML syntax error: expected a single document", result.stderr)


def test_every_error_reported_at_once(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text("name: Bad_Name\n"           # 1
                   "model:\n"                   # 2
                   "  id: org/m\n"              # 3
                   "  precision: fp7\n"         # 4
                   "image: img\n"               # 5
                   "suite:\n"                   # 6
                   "  command: pytest\n"        # 7
                   "  timeout: soon\n"          # 8
                   "extra: 1\n")                # 9
    result = run_cli("validate", job)
    assert_clean_failure(result)
    lines = [ln.strip() for ln in result.stderr.splitlines()]
    assert f"{job}: 4 errors" in lines[0]
    assert lines[1].startswith(f"{job}:1:7: name:")
    assert lines[2].startswith(f"{job}:4:14: model.precision:")
    assert lines[3].startswith(f"{job}:8:12: suite.timeout: 'soon' is not a duration")
    assert lines[4].startswith(f"{job}:9:1: extra: unknown key 'extra'")


def test_valid_file(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB)
    result = run_cli("validate", job)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{job}: valid; tiers: big"
    # Nothing was provisioned or recorded.
    state = Path(os.environ["EPHEMERA_STATE_DIR"])
    assert not state.exists() or not any(state.iterdir())


def test_tier_shows_merged_job(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB)
    result = run_cli("validate", job, "--tier", "big")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == f"{job}: valid (tier big); tiers: big"
    from ruamel.yaml import YAML

    merged = YAML(typ="safe").load(out.split("\n", 1)[1])
    assert merged["model"] == {**merged["model"], "id": "org/model", "max_model_len": 8192}
    assert merged["server"]["args"] == ["--max-num-seqs", "8"]   # lists are replaced
    assert merged["server"]["port"] == 8123                      # untouched keys stay
    assert merged["resources"] == {**merged["resources"], "provider": "docker", "spot": True}
    assert merged["timeout"] == "1h30m"
    assert "tiers" not in merged


def test_json_output(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB)
    result = run_cli("validate", job, "--tier", "big", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["valid"] is True and doc["tier"] == "big" and doc["tiers"] == ["big"]
    assert doc["job"]["model"]["max_model_len"] == 8192
    assert doc["job"]["suite"]["timeout"] == "20m"

    plain = json.loads(run_cli("validate", job, "--json").stdout)
    assert plain["tier"] is None and plain["job"]["model"]["max_model_len"] == 2048


def test_tier_on_file_without_tiers(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD_JOB.split("tiers:")[0])
    result = run_cli("validate", job, "--tier", "big")
    assert_clean_failure(result)
    assert "unknown tier 'big' (available: none defined)" in result.stderr


def test_validate_without_argument_is_a_usage_error():
    result = run_cli("validate")
    assert_clean_failure(result)
    assert "JOB_FILE" in result.stderr


def test_schema_is_valid_json_schema_that_accepts_a_good_job(tmp_path: Path):
    import jsonschema
    from ruamel.yaml import YAML

    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    assert {"name", "model", "image", "suite"} <= set(schema["properties"])
    assert {"name", "model", "image", "suite"} <= set(schema["required"])

    validator = validator_cls(schema)
    good = YAML(typ="safe").load(GOOD_JOB)
    assert list(validator.iter_errors(good)) == []

    # Unknown keys and bad durations are refused by the schema too (editors flag them).
    bad = {**good, "gpus": 2}
    assert any("gpus" in e.message for e in validator.iter_errors(bad))
    bad_duration = {**good, "suite": {**good["suite"], "timeout": "20 minutes"}}
    assert list(validator.iter_errors(bad_duration))
    # So are numbers beyond their bounds: a deadline of aeons, a TP size of a million.
    assert list(validator.iter_errors({**good, "timeout": 10**12}))
    assert list(validator.iter_errors({**good, "server": {"tensor_parallel_size": 10**6}}))
