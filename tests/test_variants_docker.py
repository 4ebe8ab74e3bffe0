"""A/B variants end to end: the docker provider, the built-in CPU image with real vLLM,
two tiny random models (the built-in one, and one written with another seed).

1. parallel: one container per variant at once; both pass, the report shows both, and
   `ephemera compare` reads the two variants back from the history and artifacts.
2. same-machine: one container, the models served one after the other; a compare gate
   that B cannot meet fails the run, naming it.
3. same-machine, SIGINT while the second variant runs: the container is torn down and
   A's results are kept.
Nothing of any run is left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.runlib import RunProcess, ephemera, run_env, write_job

pytestmark = [pytest.mark.vllm, pytest.mark.docker]

BENCH = {"requests": 16, "concurrency": 4, "input_len": 16, "output_len": 8}


@pytest.fixture(scope="module")
def second_model(tmp_path_factory, cpu_env_python) -> Path:
    """The tiny Llama's recipe with another seed: the same shapes, other weights."""
    from ephemera.builtins.tiny_model import RECIPES

    out = tmp_path_factory.mktemp("models")
    script = out / "make.py"
    script.write_text(RECIPES["tiny-llama"])
    done = subprocess.run([str(cpu_env_python), str(script), str(out / "tiny-b"), "4321"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "tiny-b"


def containers_of(run_id: str) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        return [c.name for c in client.containers.list(all=True)
                if (c.labels.get("dev.ephemera.run-id") or "").startswith(run_id)]
    finally:
        client.close()


def ab_job(tmp_path: Path, model_b: Path, compare: dict) -> Path:
    return write_job(tmp_path, "docker-cpu-smoke.yaml", {
        "name": "ab-cpu", "benchmark": BENCH,
        "variants": {"a": {}, "b": {"model": {"id": str(model_b)}}}, "compare": compare})


def environment(tmp_path: Path) -> dict[str, str]:
    return run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                   EPHEMERA_CONFIG=str(tmp_path / "none.toml"))


def check_variant(entry: dict, name: str) -> None:
    assert entry["variant"] == name and entry["status"] == "passed", entry
    artifacts = Path(entry["artifacts_dir"])
    assert artifacts.name == name
    for file in ("junit.xml", "vllm.log", "benchmark.json", "results.json"):
        assert (artifacts / file).exists(), (name, file)
    assert entry["benchmark"]["metrics"]["completed_requests"] == BENCH["requests"]


@pytest.mark.timeout(900)
def test_parallel_variants_on_docker(tmp_path, docker_engine, cpu_image, tiny_model, second_model):
    env = environment(tmp_path)
    job = ab_job(tmp_path, second_model, {"placement": "parallel",
                                          "gates": {"pass_rate_drop_max": 0.0}})
    run = RunProcess(job, env, cwd=tmp_path)
    code, out = run.finish(timeout=600)
    assert code == 0, run.stderr[-4000:]
    assert out["placement"] == "parallel" and out["status"] == "passed"
    a, b = out["variants"]
    check_variant(a, "a")
    check_variant(b, "b")
    assert a["run_id"] == f"{out['run_id']}-a" and b["teardown_verified"] is True
    # both instances ran at once: each variant logged its own launch
    assert "[a] " in run.stderr and "[b] " in run.stderr
    pair = out["comparison"]["comparisons"][0]
    assert pair["paired"]["both_passed"] >= 3 and pair["paired"]["mcnemar_p"] == 1.0
    assert pair["e2e_p90_ratio_ci95"] is not None
    group = Path(out["artifacts_dir"])
    assert "| e2e_p90_ms |" in (group / "compare.md").read_text()
    assert containers_of(out["run_id"]) == []
    # the same two runs, compared afterwards from the history and their artifacts
    shown = ephemera("compare", a["run_id"], b["run_id"], "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    again = json.loads(shown.stdout)["comparisons"][0]
    assert again["ratios"]["e2e_p90_ms"] == pytest.approx(pair["ratios"]["e2e_p90_ms"])


@pytest.mark.timeout(900)
def test_same_machine_variants_and_a_gate_b_cannot_meet(tmp_path, docker_engine, cpu_image, tiny_model,
                                                        second_model):
    env = environment(tmp_path)
    job = ab_job(tmp_path, second_model, {"placement": "same-machine",
                                          "gates": {"pass_rate_drop_max": 0.02,
                                                    "e2e_p90_ratio_max": 0.01}})
    run = RunProcess(job, env, cwd=tmp_path)
    code, out = run.finish(timeout=600)
    assert code == 1, run.stderr[-4000:]
    assert out["placement"] == "same-machine" and out["status"] == "failed"
    check_variant(out["variants"][0], "a")
    check_variant(out["variants"][1], "b")
    assert "1 compare gate(s) failed: compare gate e2e_p90_ratio_max: b's e2e_p90_ms" in out["message"]
    assert "above the maximum 0.01" in out["message"]
    gates = {g["gate"]: g["passed"] for g in out["comparison"]["comparisons"][0]["gates"]}
    assert gates == {"compare.pass_rate_drop_max": True, "compare.e2e_p90_ratio_max": False}
    # one machine: one launch, one teardown, one cost report for it
    assert run.stderr.count("> provision") == 1 and run.stderr.count("teardown verified") == 1
    group = Path(out["artifacts_dir"])
    assert (group / "cost.json").exists() and (group / "compare.json").exists()
    assert containers_of(out["run_id"]) == []


@pytest.mark.timeout(900)
def test_sigint_during_the_second_variant_keeps_a(tmp_path, docker_engine, cpu_image, tiny_model,
                                                  second_model):
    env = environment(tmp_path)
    job = ab_job(tmp_path, second_model, {"placement": "same-machine"})
    run = RunProcess(job, env, cwd=tmp_path)
    run.wait_for("variant b: ", timeout=400)
    deadline = time.monotonic() + 120     # A's health phase came first; wait for B's
    while run.stderr.count("> health") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.stderr.count("> health") == 2, run.stderr[-3000:]
    group_id = run.stderr.split("A/B run ", 1)[1].split(":", 1)[0]
    run.signal(signal.SIGINT)
    code, out = run.finish(timeout=300)
    assert code == 130, run.stderr[-4000:]
    assert out["status"] == "interrupted"
    a, b = out["variants"]
    check_variant(a, "a")
    assert b["status"] == "interrupted"
    assert "not judged" in " ".join(out["comparison"]["notes"])
    assert "teardown verified" in run.stderr
    assert containers_of(group_id) == []
    kept = json.loads((Path(a["artifacts_dir"]) / "results.json").read_text())
    assert kept["results"]["total"]["passed"] >= 3
