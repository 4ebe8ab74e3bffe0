"""A provider plugin outside ephemera's packages (tests/plugins/ephemera_dirhost),
registered only through the ``ephemera.providers`` entry point of its distribution,
runs a job end to end from what it declares in ``Capabilities``: its machine runs the
job's image through Docker (a bridge network and a free port, as on a shared host), its
billing minimum reaches the cost report, and teardown leaves nothing. The server is
the stand-in for vLLM inside the built-in CPU image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.standin_targets import _containers, _env, _job
from tests.runlib import RunProcess, ephemera

pytestmark = pytest.mark.timeout(300)


def test_plugin_is_listed_with_its_distribution(plugin_site, tmp_path):
    env = _env(tmp_path, **plugin_site)
    out = ephemera("providers", "--json", env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["providers"]}
    assert rows["dirhost"]["usable"] is True
    assert rows["dirhost"]["distribution"] == "ephemera-dirhost"


def test_plugin_runs_a_job_end_to_end(plugin_site, dirhost_root, tmp_path, docker_engine, cpu_image):
    job = _job(tmp_path, "dirhost", image="ephemera/cpu", python="python3")
    env = _env(tmp_path, DIRHOST_ROOT=str(dirhost_root), **plugin_site)
    run = RunProcess(job, env)
    code, result = run.finish(timeout=240)
    assert code == 0, run.stderr[-3000:]
    names = [p["name"] for p in result["phases"]]
    assert "image" in names, names          # the job's image ran through the machine's Docker
    assert result["provider"] == "dirhost"
    cost = json.loads((Path(result["artifacts_dir"]) / "cost.json").read_text())
    assert cost["min_billed_seconds"] == 30
    assert cost["provider"] == "dirhost"
    run_id = result["run_id"]
    assert _containers(run_id) == []
    assert not (dirhost_root / run_id).exists()
    assert "suite-started" in (Path(result["artifacts_dir"]) / "suite.log").read_text()
