"""Start fast: `ephemera run` on the docker provider with real vLLM (CPU) against a plain
script doing the same work phase after phase, in alternating pairs.

The plain script: `docker run` of the same image with the same vLLM flags (host network,
the same shared memory), /health and /v1/models polled every 0.25 s, then the prepare
step, then the suite (the same pytest suite, by `docker exec`), then `docker rm -f`.
ephemera runs the same job with the prepare step as `suite.prepare`, so it overlaps
vLLM's start.

    prepare mode   (suite.prepare = sleep 20): target ephemera / plain <= 0.75x
    overhead mode  (no prepare step): ephemera's own overhead, target <= 1.03x

Prints each pair, the median and spread of the ratio, and the median of each phase of
ephemera's runs (from `--json`: where its time goes). Asserts nothing. Needs a Docker
engine, the CPU image and the tiny model (bash .ci/setup).

    .venv/bin/python benchmarks/bench_start.py [--mode prepare|overhead|both] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ephemera_command  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "jobs" / "docker-cpu-smoke.yaml"
POLL = 0.25
PREPARE_SECONDS = 20


# ---------------------------------------------------------------------- the job
def write_job(directory: Path, prepare_seconds: int) -> Path:
    """docker-cpu-smoke with host networking and, when asked, a prepare step."""
    yaml = YAML()
    data = yaml.load(TEMPLATE.read_text())
    data.pop("tiers", None)
    data["name"] = "bench-start"
    data["resources"]["docker"] = {"network": "host"}
    if prepare_seconds:
        data["suite"]["prepare"] = [f"sleep {prepare_seconds}"]
    shutil.copytree(REPO / "jobs" / "suites", directory / "suites", dirs_exist_ok=True)
    path = directory / "bench-start.yaml"
    with path.open("w") as fh:
        yaml.dump(data, fh)
    return path


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EPHEMERA_STATE_DIR=str(tmp / "state"), EPHEMERA_DATA_DIR=str(tmp / "data"),
               EPHEMERA_ARTIFACTS_DIR=str(tmp / "runs"), EPHEMERA_CONFIG=str(tmp / "none.toml"))
    env.pop("GITHUB_ACTIONS", None)
    env.pop("GITHUB_STEP_SUMMARY", None)
    return env


# ---------------------------------------------------------------------- ephemera
def ephemera_run(job: Path, tmp: Path) -> tuple[float, dict[str, tuple[float, float]]]:
    """Wall seconds of `ephemera run --json`, and its phases: name -> (start, seconds)."""
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run([*ephemera_command(), "run", str(job), "--json"], capture_output=True,
                          text=True, env=env_for(tmp), cwd=tmp)
    total = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"ephemera run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases = {p["name"]: (p["start"], p["seconds"]) for p in json.loads(proc.stdout)["phases"]}
    return total, phases


# ---------------------------------------------------------------------- plain script
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(base: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            if response.status != 200:
                return False
        with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as response:
            return model in [m["id"] for m in json.loads(response.read())["data"]]
    except (OSError, ValueError, KeyError):
        return False


def plain_run(job: Path, image: str, model_dir: Path, prepare_seconds: int) -> dict[str, float]:
    """The same work, phase after phase; the seconds of each and the total."""
    from ephemera.lifecycle.server import build_server_command
    from ephemera.spec.job import BUILTIN_CPU_IMAGE
    from ephemera.spec.jobfile import load_job

    loaded = load_job(job)
    port = free_port()
    cmd = build_server_command(loaded.job, model_path="/model", tensor_parallel_size=1,
                               python="python3", host="127.0.0.1", port=port)
    name = f"bench-plain-{os.getpid()}-{port}"
    env = {**loaded.job.env, **loaded.job.server.env}
    if loaded.job.image.split(":")[0] == BUILTIN_CPU_IMAGE:   # as ephemera's server_env
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env_flags = [f"-e{k}={v}" for k, v in env.items()]
    marks = {"begin": time.monotonic()}
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host",
                    "--shm-size", "1g", "--init", "--security-opt", "no-new-privileges",
                    *env_flags, "-v", f"{model_dir}:/model:ro", "-v", f"{job.parent}:/job",
                    "--entrypoint", "sh", image, "-c", cmd.shell],
                   check=True, capture_output=True)
    marks["started"] = time.monotonic()
    base = f"http://127.0.0.1:{port}"
    try:
        while not ready(base, cmd.served_name):
            if time.monotonic() - marks["begin"] > 600:
                raise SystemExit("the plain script's vLLM did not become healthy in 600 s")
            time.sleep(POLL)
        marks["healthy"] = time.monotonic()
        if prepare_seconds:
            subprocess.run(["docker", "exec", name, "sh", "-c", f"sleep {prepare_seconds}"], check=True)
        marks["prepared"] = time.monotonic()
        suite = (f"cd /job && {loaded.job.suite.command}")
        exec_env = [f"-eOPENAI_BASE_URL={base}/v1", "-eOPENAI_API_KEY=EMPTY",
                    f"-eEPHEMERA_MODEL={cmd.served_name}", "-eEPHEMERA_ARTIFACTS=/tmp"]
        suite_run = subprocess.run(["docker", "exec", *exec_env, name, "sh", "-c", suite],
                                   capture_output=True, text=True)
        if suite_run.returncode != 0:
            raise SystemExit(f"the plain script's suite failed:\n{suite_run.stdout[-2000:]}")
        marks["suite"] = time.monotonic()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    marks["end"] = time.monotonic()
    return {"start": marks["started"] - marks["begin"], "health": marks["healthy"] - marks["started"],
            "prepare": marks["prepared"] - marks["healthy"], "suite": marks["suite"] - marks["prepared"],
            "remove": marks["end"] - marks["suite"], "total": marks["end"] - marks["begin"]}


# ---------------------------------------------------------------------- report
def spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    quartiles = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"min {low:.3f}x, max {high:.3f}x, IQR {quartiles[2] - quartiles[0]:.3f}"


def measure(mode: str, pairs: int, image: str, model_dir: Path, tmp: Path) -> None:
    prepare_seconds = PREPARE_SECONDS if mode == "prepare" else 0
    job = write_job(tmp / mode, prepare_seconds)
    target = 0.75 if mode == "prepare" else 1.03
    what = f"suite.prepare = sleep {prepare_seconds}" if prepare_seconds else "no prepare step"
    print(f"\n== {mode}: {what} ({pairs} alternating pairs, target <= {target}x)", flush=True)
    ratios: list[float] = []
    phase_times: dict[str, list[tuple[float, float]]] = {}
    plains: list[dict[str, float]] = []
    for index in range(pairs):
        first_ephemera = index % 2 == 0
        if first_ephemera:
            eph, phases = ephemera_run(job, tmp / f"{mode}-{index}")
            plain = plain_run(job, image, model_dir, prepare_seconds)
        else:
            plain = plain_run(job, image, model_dir, prepare_seconds)
            eph, phases = ephemera_run(job, tmp / f"{mode}-{index}")
        ratios.append(eph / plain["total"])
        plains.append(plain)
        for name, value in phases.items():
            phase_times.setdefault(name, []).append(value)
        print(f"pair {index + 1} ({'ephemera first' if first_ephemera else 'plain first'}): "
              f"ephemera {eph:.2f}s, plain {plain['total']:.2f}s "
              f"[docker run {plain['start']:.2f}, health {plain['health']:.2f}, "
              f"prepare {plain['prepare']:.2f}, suite {plain['suite']:.2f}, rm {plain['remove']:.2f}] "
              f"-> {ratios[-1]:.3f}x", flush=True)
    print(f"{mode}: ephemera / plain median {statistics.median(ratios):.3f}x ({spread(ratios)}; "
          f"target <= {target}x)")
    print("ephemera's phases (median start and length, seconds):")
    for name, values in phase_times.items():
        print(f"  {name:<14} start {statistics.median(v[0] for v in values):7.2f}  "
              f"took {statistics.median(v[1] for v in values):7.2f}")
    print("plain script (median seconds): " + ", ".join(
        f"{key} {statistics.median(p[key] for p in plains):.2f}"
        for key in ("start", "health", "prepare", "suite", "remove", "total")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["prepare", "overhead", "both"], default="both")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    from ephemera.builtins.cpu_image import ensure_cpu_image
    from ephemera.builtins.tiny_model import ensure_tiny_model

    image = ensure_cpu_image(lambda _line: None)
    model_dir = ensure_tiny_model(lambda _line: None)
    print(f"image {image}, model {model_dir}, {os.cpu_count()} CPUs; "
          f"ephemera: {shlex.join(ephemera_command())}")
    modes = ["prepare", "overhead"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            measure(mode, args.pairs, image, model_dir, Path(tmp))


if __name__ == "__main__":
    main()
