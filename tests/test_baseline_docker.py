"""Results, benchmark, gates and baseline end to end: the docker provider, the built-in
CPU image with real vLLM, the retail-style example job.

Run A (bounds lowered) passes although one check fails, and its benchmark figures reach
`--json`, the step summary and the history. Two more passing runs of branch main are
recorded directly, and one of another branch. Run B, on a server forced to serve one
request at a time (so its P90 latency grows), fails: the kitchen_safety category below
its bound, with both figures, and e2e_p90_ms against the baseline of the main runs,
which the other branch's run did not move."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.runlib import RunProcess, ephemera, run_env, write_job

pytestmark = [pytest.mark.vllm, pytest.mark.docker]

LOWERED = {"pass_rate": 0.8, "pass_rate_by": {"group": "property:category",
                                              "min": {"default": 0.95, "kitchen_safety": 0.6}}}
SUITE_ENV = {"RETAIL_CHECK_ANSWERS": "fridge-temperature"}   # one kitchen check fails
BENCH = {"requests": 40, "concurrency": 8, "input_len": 32, "output_len": 16, "warmup": 2}


def record_copy(db: Path, run_id: str, branch: str, metrics: dict, minutes_ago: int) -> None:
    from ephemera.results.history import RunRecord, record_run
    from ephemera.results.judgements import record_judgement

    record_run(RunRecord(run_id=run_id, job="retail-cpu-gates", tier=None, model="m",
                         provider="docker", instance_type="cpu", region=None, status="passed",
                         exit_code=0, started_at=datetime.now(UTC) - timedelta(minutes=minutes_ago),
                         duration_seconds=60.0, cost_usd=0.0, phases={}), path=db)
    record_judgement(run_id, branch=branch, commit="0" * 40, metrics=metrics, path=db)


@pytest.mark.timeout(900)
def test_gates_benchmark_and_baseline_on_docker(tmp_path, docker_engine, cpu_image, tiny_model):
    summary = tmp_path / "step-summary.md"
    env = run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                  EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"), EPHEMERA_CONFIG=str(tmp_path / "none.toml"),
                  GITHUB_REF="refs/heads/main", GITHUB_SHA="a" * 40, GITHUB_STEP_SUMMARY=str(summary))
    db = tmp_path / "data" / "history.sqlite3"

    # Run A: the bounds lowered; it passes although the suite exited non-zero.
    job_a = write_job(tmp_path, "retail-cpu-gates.yaml", {
        "suite": {"env": SUITE_ENV}, "benchmark": BENCH, "gates": LOWERED})
    run = RunProcess(job_a, env, cwd=tmp_path)
    code, a = run.finish(timeout=400)
    assert code == 0, run.stderr[-4000:]
    assert a["status"] == "passed" and "every pass-rate gate held" in a["message"]
    kitchen = a["results"]["groups"]["property:category"]["kitchen_safety"]
    assert (kitchen["passed"], kitchen["failed"]) == (2, 1)
    figures = a["benchmark"]["metrics"]
    assert figures["completed_requests"] == 40 and figures["failed_requests"] == 0
    for name in ("ttft_p90_ms", "tpot_p90_ms", "itl_p90_ms", "e2e_p90_ms", "e2e_p99_ms",
                 "requests_per_s", "output_tokens_per_s"):
        assert figures[name] > 0, name
    e2e_gate = next(g for g in a["gates"] if g["gate"] == "benchmark.e2e_p90_ms")
    assert e2e_gate["skipped"] and "no baseline yet" in e2e_gate["line"]
    text = summary.read_text()
    assert "#### Benchmark" in text and "| kitchen_safety | 2 | 1 |" in text and "e2e (ms)" in text
    artifacts = Path(a["artifacts_dir"])
    assert (artifacts / "benchmark.json").exists() and (artifacts / "results.md").exists()
    shown = json.loads(ephemera("results", a["run_id"], "--json", env=env).stdout)
    assert shown["branch"] == "main" and shown["metrics"]["e2e_p90_ms"] == figures["e2e_p90_ms"]

    # Two more passing runs of main with A's figures, and a fast one of another branch.
    record_copy(db, "retail-main-1", "main", figures, minutes_ago=30)
    record_copy(db, "retail-main-2", "main", figures, minutes_ago=20)
    record_copy(db, "retail-feature-1", "feature", {**figures, "e2e_p90_ms": 0.001}, minutes_ago=1)
    base = json.loads(ephemera("baseline", str(job_a), "--json", env=env).stdout)
    assert {r["run_id"] for r in base["runs"]} == {a["run_id"], "retail-main-1", "retail-main-2"}
    assert base["median"]["e2e_p90_ms"] == pytest.approx(figures["e2e_p90_ms"])

    # Run B: one request at a time on the server, the job's own bounds.
    job_b = write_job(tmp_path, "retail-cpu-gates.yaml", {
        "suite": {"env": SUITE_ENV}, "benchmark": BENCH,
        "server": {"args": ["--enforce-eager", "--max-num-seqs", "1"]}})
    run = RunProcess(job_b, env, cwd=tmp_path)
    code, b = run.finish(timeout=400)
    assert code == 1, run.stderr[-4000:]
    assert b["status"] == "failed"
    assert "kitchen_safety: pass rate 66.7% (2/3) is below the minimum 100.0%" in b["message"]
    failed = {g["gate"]: g for g in b["gates"] if not g["passed"]}
    slow = failed["benchmark.e2e_p90_ms"]
    assert slow["value"] > 1.3 * figures["e2e_p90_ms"]
    assert slow["baseline"] == pytest.approx(figures["e2e_p90_ms"])
    assert set(slow["baseline_runs"]) == {a["run_id"], "retail-main-1", "retail-main-2"}
    assert "e2e_p90_ms" in b["message"] and "baseline" in slow["line"]
    assert "retail-feature-1" not in slow["line"]
    stored = json.loads(ephemera("results", b["run_id"], "--json", env=env).stdout)
    assert stored["status"] == "failed" and any(not g["passed"] for g in stored["gates"])
    assert "benchmark.e2e_p90_ms" in summary.read_text()
