"""The GitHub Actions files: valid against GitHub's schemas, clean under zizmor, every
third-party action pinned by commit, shell steps parse, and the action's result step
turns a real `--json` result file into step outputs. (actionlint itself runs in the
workflow on GitHub; it cannot be installed offline.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTION = ROOT / ".github" / "actions" / "ephemera" / "action.yml"


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def load(path: Path):
    return YAML(typ="safe").load(path.read_text())


def test_files_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "gpu-tests.yml"} <= names
    assert ACTION.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_github_schema(path):
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                             str(path)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_action_matches_github_schema():
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions",
                             str(ACTION)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_zizmor_finds_nothing():
    result = subprocess.run([tool("zizmor"), "--offline", str(ROOT / ".github")],
                            capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings" in result.stdout + result.stderr


def all_steps():
    for path in [*WORKFLOWS, ACTION]:
        doc = load(path)
        if "runs" in doc:
            yield from ((path, s) for s in doc["runs"]["steps"])
        for job in (doc.get("jobs") or {}).values():
            yield from ((path, s) for s in job.get("steps", []))


def test_third_party_actions_pinned_by_commit_with_version_comment():
    uses_re = re.compile(r"^\s*(?:-\s*)?uses:\s*(\S+)(.*)$")
    seen = 0
    for path in [*WORKFLOWS, ACTION]:
        for line in path.read_text().splitlines():
            match = uses_re.match(line)
            if not match or match.group(1).startswith("./"):
                continue
            ref = match.group(1)
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref} not pinned"
            assert re.search(r"#\s*v\d", match.group(2)), f"{path.name}: {ref} lacks a version comment"
            seen += 1
    assert seen >= 6


def test_no_expressions_inside_run_scripts():
    for path, step in all_steps():
        if "run" in step:
            assert "${{" not in step["run"], f"{path.name}: step '{step.get('name')}' expands an expression in run:"


def test_shell_steps_parse():
    for path, step in all_steps():
        if "run" in step and step.get("shell", "bash") == "bash":
            result = subprocess.run(["bash", "-n"], input=step["run"], capture_output=True, text=True)
            assert result.returncode == 0, f"{path.name}: {step.get('name')}: {result.stderr}"


def test_action_contract():
    action = load(ACTION)
    assert {"job", "tier", "version"} <= set(action["inputs"])
    assert set(action["outputs"]) == {"run-id", "status", "cost-usd"}
    steps = {s.get("name"): s for s in action["runs"]["steps"]}
    cleanup = steps["Tear down anything left"]
    assert cleanup["if"] == "always()" and "ephemera down --all" in cleanup["run"]
    assert steps["Upload artifacts"]["if"] == "always()"
    assert steps["Upload artifacts"]["uses"].startswith("actions/upload-artifact@")
    assert "exec " in steps["Run the job"]["run"] and "--json" in steps["Run the job"]["run"]


def test_gpu_workflow_triggers_concurrency_and_oidc():
    wf = load(ROOT / ".github" / "workflows" / "gpu-tests.yml")
    # ruamel reads the bare key `on` as the string "on"
    triggers = wf["on"]
    assert {"pull_request", "schedule", "push"} <= set(triggers)
    assert triggers["push"]["tags"]
    assert "cancel-in-progress" in wf["concurrency"] and "group" in wf["concurrency"]
    job = wf["jobs"]["gpu-test"]
    assert job["permissions"]["id-token"] == "write"
    assert any(s.get("uses", "").startswith("aws-actions/configure-aws-credentials@") for s in job["steps"])
    tier = job["env"]["TIER"]
    for word in ("smoke", "full", "release"):
        assert word in tier


@pytest.mark.timeout(60)
@pytest.mark.parametrize("result, outcome, expected", [
    ('{"run_id": "r-123", "status": "passed", "cost_usd": 0.123456}', "success",
     {"run-id": "r-123", "status": "passed", "cost-usd": "0.1235"}),
    ('{"run_id": "r-9", "status": "failed", "cost": {"cost_usd": 2}}', "failure",
     {"run-id": "r-9", "status": "failed", "cost-usd": "2.0000"}),
    (None, "failure", {"run-id": "", "status": "error", "cost-usd": ""}),
    ("{truncated", "cancelled", {"run-id": "", "status": "error", "cost-usd": ""}),
])
def test_result_step_sets_outputs(tmp_path, result, outcome, expected):
    step = next(s for s in load(ACTION)["runs"]["steps"] if s.get("id") == "result")
    result_file = tmp_path / "ephemera-result.json"
    if result is not None:
        result_file.write_text(result)
    output = tmp_path / "github-output"
    env = {**os.environ, "EPHEMERA_RESULT_FILE": str(result_file), "GITHUB_OUTPUT": str(output),
           "EPHEMERA_RUN_OUTCOME": outcome}
    path_dirs = [str(BIN), *os.environ.get("PATH", "").split(os.pathsep)]
    env["PATH"] = os.pathsep.join(path_dirs)
    run = subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True,
                         text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert lines == expected


def test_workflow_job_file_loads_with_the_strict_schema_for_every_tier(monkeypatch):
    """The job the GPU workflow runs: the raw YAML (HF_TOKEN expanded) passes Job, and
    each tier of the ladder merges into a valid job that does what its name says."""
    from ephemera.spec.job import Job
    from ephemera.spec.jobfile import deep_merge, load_job

    path = ROOT / "jobs" / "qwen3-4b-aws.yaml"
    assert "jobs/qwen3-4b-aws.yaml" in (ROOT / ".github" / "workflows" / "gpu-tests.yml").read_text()
    raw = YAML(typ="safe").load(path.read_text())
    raw["env"]["HF_TOKEN"] = raw["env"]["HF_TOKEN"].replace("${HF_TOKEN}", "hf_x")
    base = Job.model_validate(raw)
    assert set(base.tiers) == {"smoke", "full", "release"}
    jobs = {name: Job.model_validate(deep_merge(raw, base.tiers[name])) for name in base.tiers}
    smoke, full, release = jobs["smoke"], jobs["full"], jobs["release"]
    assert smoke.model.precision == "int4" and "-m smoke" in smoke.suite.command
    assert smoke.suite.timeout < full.suite.timeout < release.suite.timeout
    assert full.model.precision == release.model.precision == "bf16"
    assert release.model.max_model_len > full.model.max_model_len > smoke.model.max_model_len
    assert release.suite.env["RUN_LOAD_TESTS"] == "1" and "RUN_LOAD_TESTS" not in full.suite.env
    # and through the loader the CLI uses (env expansion, suite files present)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    for tier in ("smoke", "full", "release"):
        assert load_job(path, tier=tier).job.name == "qwen3-4b"
