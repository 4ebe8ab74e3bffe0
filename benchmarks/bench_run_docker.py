"""Orchestration overhead of `ephemera run` with the docker provider, and how fast a
SIGINT gets the container removed.

    overhead = total wall time - vLLM's own start (the health phase) - the suite's own time

Targets: overhead under 3 s; SIGINT to container gone under 5 s. Needs a Docker
engine, the CPU image and the tiny model (bash .ci/setup). Prints figures; asserts
nothing (the machines are noisy).

    .venv/bin/python benchmarks/bench_run_docker.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "jobs" / "docker-cpu-smoke.yaml"


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EPHEMERA_STATE_DIR=str(tmp / "state"), EPHEMERA_DATA_DIR=str(tmp / "data"),
               EPHEMERA_ARTIFACTS_DIR=str(tmp / "runs"))
    env.pop("GITHUB_ACTIONS", None)
    return env


def one_run(tmp: Path) -> dict[str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ephemera", "run", str(JOB), "--json"],
                          capture_output=True, text=True, env=env_for(tmp), cwd=tmp)
    total = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    phases = {p["name"]: p["seconds"] for p in result["phases"]}
    suite_log = Path(result["artifacts_dir"]) / "suite.log"
    own_suite = None
    for line in suite_log.read_text().splitlines():
        if " passed in " in line:  # pytest's own figure, e.g. "5 passed in 0.43s"
            own_suite = float(line.rsplit(" in ", 1)[1].split("s")[0])
    return {"total": total, "health": phases["health"], "suite_phase": phases["suite"],
            "suite_own": own_suite or phases["suite"],
            "overhead": total - phases["health"] - (own_suite or phases["suite"]),
            "teardown": phases["teardown"], "provision": phases["provision"], "upload": phases["upload"]}


def container_exists(run_id: str) -> bool:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=dev.ephemera.run-id={run_id}"],
                         capture_output=True, text=True).stdout
    return bool(out.strip())


def sigint_to_gone(tmp: Path) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    err = tmp / "sigint.stderr"
    with err.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "ephemera", "run", str(JOB)], stdout=subprocess.DEVNULL,
                                stderr=fh, env=env_for(tmp), cwd=tmp, start_new_session=True)
    deadline = time.monotonic() + 300
    while "> health" not in err.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("the run did not reach the health phase")
        time.sleep(0.1)
    text = err.read_text()
    run_id = text.split("] run ", 1)[1].split(":", 1)[0]
    time.sleep(2.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    while container_exists(run_id):
        if time.monotonic() - sent > 60:
            raise SystemExit("container still there 60 s after SIGINT")
        time.sleep(0.05)
    gone = time.monotonic() - sent
    proc.wait(timeout=60)
    return gone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.runs):
            row = one_run(Path(tmp) / f"r{index}")
            rows.append(row)
            print(f"run {index + 1}: total {row['total']:.2f}s, vLLM start {row['health']:.2f}s, "
                  f"suite {row['suite_own']:.2f}s (phase {row['suite_phase']:.2f}s) -> overhead "
                  f"{row['overhead']:.2f}s  [provision {row['provision']:.2f}s, upload {row['upload']:.2f}s, "
                  f"teardown {row['teardown']:.2f}s]")
        print(f"orchestration overhead: median {statistics.median(r['overhead'] for r in rows):.2f}s "
              f"(target < 3 s)")
        gone = sigint_to_gone(Path(tmp) / "sigint")
        print(f"SIGINT to container gone: {gone:.2f}s (target < 5 s)")


if __name__ == "__main__":
    main()
