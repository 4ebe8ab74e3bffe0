"""The GitLab template (templates/ephemera.yml, a CI/CD component) and its `include:`
form (.gitlab/ephemera.yml), checked offline: the `spec:` header and the jobs are
separate YAML documents, each valid against GitLab's CI schema as check-jsonschema
ships it; `$[[ inputs.x ]]` never in a boolean or enum field; the job's contract
(ephemera as the job's process, artifacts always, JUnit and dotenv reports, this
job's own state directory, rules per pipeline, OIDC id token); its shell parses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "templates" / "ephemera.yml"
INCLUDE = ROOT / ".gitlab" / "ephemera.yml"
BIN = Path(sys.executable).parent
INPUT = re.compile(r"\$\[\[\s*inputs\.([\w-]+)\s*\]\]")


def documents(path: Path) -> list:
    return list(YAML(typ="safe").load_all(path.read_text()))


def the_job(path: Path = COMPONENT) -> dict:
    jobs = documents(path)[1]
    assert len(jobs) == 1
    return next(iter(jobs.values()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", [COMPONENT, INCLUDE], ids=["component", "include"])
@pytest.mark.parametrize("index", [0, 1], ids=["spec", "jobs"])
def test_each_document_matches_gitlabs_schema(path, index, tmp_path):
    import json

    part = tmp_path / f"{path.stem}-{index}.json"
    part.write_text(json.dumps(documents(path)[index]))
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci",
                             str(part)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_the_schema_check_catches_an_input_in_an_enum_field(tmp_path):
    """The check above is not vacuous: an input where GitLab expects one of a few words
    (artifacts:when) is refused."""
    import json

    job = the_job()
    job["artifacts"]["when"] = "$[[ inputs.when ]]"
    part = tmp_path / "bad.json"
    part.write_text(json.dumps({"ephemera": job}))
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci",
                             str(part)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 1 and "artifacts.when" in result.stdout


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, node


def test_inputs_only_in_free_text_fields():
    allowed = {".stage", ".image", ".variables."}
    job = the_job()
    for path, value in _walk(job):
        if isinstance(value, str) and INPUT.search(value):
            assert any(path.startswith(a) for a in allowed), f"input used in {path}"
        if isinstance(value, bool):
            assert path in (".interruptible",), path
    assert job["interruptible"] is True and job["artifacts"]["when"] == "always"


def test_every_input_is_used_and_both_files_offer_the_same_inputs():
    component = documents(COMPONENT)[0]["spec"]["inputs"]
    include = documents(INCLUDE)[0]["spec"]["inputs"]
    assert {"job", "tier", "provider", "version"} <= set(component)
    assert set(component) == set(include)
    for name, spec in component.items():
        assert spec.get("default") == include[name].get("default"), name
    used = set(INPUT.findall(COMPONENT.read_text().split("\n---\n", 1)[1]))
    assert used == set(component)
    forwarded = documents(INCLUDE)[1]["include"][0]
    assert forwarded["local"] == "templates/ephemera.yml"
    assert forwarded["inputs"] == {name: f"$[[ inputs.{name} ]]" for name in include}


def test_job_contract():
    job = the_job()
    script = "\n".join(job["script"])
    assert script.rstrip().splitlines()[-1].strip().startswith("exec ephemera ")
    assert "--json" in script and "--tier" in script and "--provider" in script
    after = "\n".join(job["after_script"])
    assert "ephemera down --all --force" in after
    assert "EPHEMERA_STATUS=" in after and "EPHEMERA_COST_USD=" in after
    assert job["artifacts"]["reports"] == {"junit": "ephemera-runs/**/junit*.xml",
                                           "dotenv": "ephemera.env"}
    assert "ephemera-runs/" in job["artifacts"]["paths"]
    variables = job["variables"]
    # This job's runs only: the state directory carries the CI job's id.
    assert "$CI_JOB_ID" in variables["EPHEMERA_STATE_DIR"]
    assert variables["EPHEMERA_ARTIFACTS_DIR"] == "ephemera-runs"
    assert job["id_tokens"]["EPHEMERA_AWS_ID_TOKEN"]["aud"] == "sts.amazonaws.com"
    # Secrets never pass through inputs: HF_TOKEN is a masked CI/CD variable.
    assert "HF_TOKEN" not in COMPONENT.read_text()


def test_rules_pick_the_tier_by_pipeline():
    rules = the_job()["rules"]
    tiers = {rule["if"]: (rule.get("variables") or {}).get("EPHEMERA_PIPELINE_TIER")
             for rule in rules}
    assert tiers['$CI_PIPELINE_SOURCE == "merge_request_event"'] == "smoke"
    assert tiers['$CI_PIPELINE_SOURCE == "schedule"'] == "full"
    assert tiers["$CI_COMMIT_TAG"] == "release"


@pytest.mark.parametrize("part", ["before_script", "script", "after_script"])
def test_shell_parses_as_posix_sh(part):
    text = "\n".join(the_job()[part])
    for shell in ("sh", "bash"):
        result = subprocess.run([shell, "-n"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, f"{shell}: {result.stderr}"
