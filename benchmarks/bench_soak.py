"""Random soak of the never-leak promise on the docker provider: N runs, each hit by a
random signal (INT, TERM, HUP or KILL) at a random moment, then `ephemera down --all`.
Prints the leaks found (goal 0) and the signal-to-gone times (median, max): from the
signal to the run's container and processes being gone (for KILL, `down --all` is
what ends them, and its time is included).

The server is the small real stand-in for vLLM (tests/standin), so a run takes seconds
and every step of it can be hit. Needs a Docker engine and the CPU image
(bash .ci/setup). Prints figures; asserts nothing (the machines are noisy).

    .venv/bin/python benchmarks/bench_soak.py [--runs 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ephemera_command  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]
JOB = """\
name: soak
model: {{id: ephemera/tiny-llama, precision: bf16, max_model_len: 256}}
image: ephemera/cpu
server:
  launcher: api_server
  python: python3
  env: {{PYTHONPATH: suite/standin}}
  health_timeout: 1m
suite:
  files: [standin]
  command: echo suite-started; sleep {suite_seconds}
  timeout: 1m
resources:
  provider: docker
  docker: {{network: host}}
timeout: 3m
"""


def containers(run_id: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=dev.ephemera.run-id={run_id}"],
                         capture_output=True, text=True).stdout
    return out.split()


def processes(run_id: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if run_id.encode() in cmdline:
                found.append(int(entry))
    return found


def run_id_of(stderr: Path) -> str | None:
    for line in stderr.read_text(errors="replace").splitlines():
        if "] run " in line and ": job " in line:
            return line.split("] run ", 1)[1].split(":", 1)[0]
    return None


def one_run(directory: Path, env: dict[str, str], rng: random.Random) -> dict:
    err = directory / "run.stderr"
    with err.open("w") as fh:
        proc = subprocess.Popen([*ephemera_command(), "run", str(directory / "soak.yaml")],
                                stdout=subprocess.DEVNULL, stderr=fh, env=env, cwd=directory,
                                start_new_session=True)
    delay = rng.uniform(0.0, 6.0)
    sig = rng.choice(SIGNALS)
    time.sleep(delay)
    run_id = run_id_of(err)
    sent = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    run_id = run_id or run_id_of(err)

    def wait_gone(limit: float) -> float | None:
        while run_id and (containers(run_id) or processes(run_id)):
            if time.monotonic() - sent > limit:
                return None
            time.sleep(0.05)
        return time.monotonic() - sent

    # A run that handled its signal must be gone by itself; after SIGKILL, `down` ends it.
    gone = wait_gone(30) if sig != signal.SIGKILL else None
    down = subprocess.run([*ephemera_command(), "down", "--all"], capture_output=True, text=True,
                          env=env, timeout=120)
    if sig == signal.SIGKILL:
        gone = wait_gone(60)
    leaks = (containers(run_id) + [str(p) for p in processes(run_id)]) if run_id else []
    return {"signal": signal.Signals(sig).name, "at": delay, "exit": proc.returncode, "run_id": run_id,
            "gone": gone, "leaks": leaks, "down_exit": down.returncode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = dict(os.environ, EPHEMERA_STATE_DIR=str(root / "state"), EPHEMERA_DATA_DIR=str(root / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(root / "runs"), EPHEMERA_CONFIG=str(root / "none.toml"))
        env.pop("GITHUB_ACTIONS", None)
        env.pop("EPHEMERA_FAULT", None)
        for index in range(args.runs):
            directory = root / f"r{index}"
            directory.mkdir()
            shutil.copytree(REPO / "tests" / "standin", directory / "standin")
            (directory / "soak.yaml").write_text(JOB.format(suite_seconds=rng.choice([1, 5, 20])))
            row = one_run(directory, env, rng)
            rows.append(row)
            gone = f"{row['gone']:.2f}s" if row["gone"] is not None else "NOT GONE"
            print(f"run {index + 1}: {row['signal']} at {row['at']:.1f}s -> exit {row['exit']}, "
                  f"gone after {gone}, down exit {row['down_exit']}, leaks {len(row['leaks'])}", flush=True)
    leaks = [r for r in rows if r["leaks"]]
    times = [r["gone"] for r in rows if r["gone"] is not None]
    print(json.dumps({"runs": len(rows), "runs_with_leaks": len(leaks),
                      "leaked": [r["leaks"] for r in leaks]}))
    if times:
        print(f"leaks found: {len(leaks)} of {len(rows)} runs (goal 0); signal to gone: "
              f"median {statistics.median(times):.2f}s, max {max(times):.2f}s")


if __name__ == "__main__":
    main()
