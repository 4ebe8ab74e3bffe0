"""How long `ephemera --help` takes to start, and what it imports.

CI calls ephemera several times per job, and people type it: start-up must stay well
under half a second. This prints the median and p90 wall time of N runs, the bare
interpreter's time for comparison, and every top-level package the help imports,
flagging SDKs that should only load when a command needs them.

    python benchmarks/bench_startup.py [-n 20] [-- ARGS...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import ephemera_command  # noqa: E402 - sibling module of this script

HEAVY = ("boto3", "botocore", "docker", "paramiko", "huggingface_hub", "torch", "vllm",
         "transformers", "moto", "requests", "pydantic", "pydantic_core", "ruamel", "rich")
SDKS = {"boto3", "botocore", "docker", "paramiko", "huggingface_hub", "torch", "vllm",
        "transformers", "moto", "requests"}




def wall_times(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def imports(args: list[str]) -> dict[str, int]:
    """Top-level package -> cumulative import time in microseconds."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ephemera", *args],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    totals: dict[str, int] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if not cumulative.isdigit():
            continue
        top = name.split(".")[0]
        if name == top:  # the package's own line carries its cumulative time
            totals[top] = max(totals.get(top, 0), int(cumulative))
        else:
            totals.setdefault(top, 0)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    parser.add_argument("args", nargs="*", default=["--help"], help="arguments (default: --help)")
    options = parser.parse_args()

    cmd = [*ephemera_command(), *options.args]
    bare = [sys.executable, "-c", "pass"]
    wall_times(cmd, 2)  # warm the page cache and .pyc files
    times, floor = [], []
    for _ in range(options.runs):  # interleaved, so load from other processes hits both alike
        times += wall_times(cmd, 1)
        floor += wall_times(bare, 1)

    print(f"command: {' '.join(cmd)}  ({options.runs} runs)")
    print(f"median: {statistics.median(times):.0f} ms   p90: {percentile(times, 90):.0f} ms   "
          f"min: {min(times):.0f} ms   max: {max(times):.0f} ms")
    print(f"bare interpreter (python -c pass): median {statistics.median(floor):.0f} ms; "
          f"ephemera's own share: {statistics.median(times) - statistics.median(floor):.0f} ms")

    totals = imports(options.args)
    loaded_heavy = [name for name in HEAVY if name in totals]
    print(f"top-level packages imported: {len(totals)}")
    slowest = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:8]
    print("slowest imports: " + ", ".join(f"{name} {us / 1000:.1f} ms" for name, us in slowest))
    if loaded_heavy:
        for name in loaded_heavy:
            flag = "SDK, should be lazy" if name in SDKS else "heavy"
            print(f"  imported: {name} ({totals[name] / 1000:.1f} ms) [{flag}]")
    else:
        print("heavy modules imported: none (" + ", ".join(HEAVY) + " all absent)")
    return 1 if any(name in SDKS for name in loaded_heavy) else 0


if __name__ == "__main__":
    sys.exit(main())
