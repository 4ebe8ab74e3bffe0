"""How long `ephemera cost` takes over a history of N synthetic runs.

The history grows by one row per run, for good, so the report must stay quick on a
long history: well under a second for 1,000 runs. This fills a fresh SQLite file with
N runs (spread over 60 days, several jobs, tiers, models and instances), then prints
the median and p90 of:

- ``summarize()`` in-process, for each grouping;
- the whole command end to end (``ephemera cost --by job --json`` as a subprocess,
  interpreter start-up included), next to ``ephemera --help`` for comparison;
- writing the N rows one run at a time (what N real runs do).

    python benchmarks/bench_cost.py [-n 1000] [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import ephemera_command  # noqa: E402 - sibling module of this script


def fill(db: Path, count: int) -> float:
    from ephemera.results.history import RunRecord, record_run

    now = datetime.now(UTC)
    statuses = ("passed", "passed", "passed", "failed", "error")
    started = time.perf_counter()
    for i in range(count):
        record_run(RunRecord(
            run_id=f"bench-{i:06d}", job=f"job-{i % 7}", tier=("smoke", "full", "release")[i % 3],
            model=f"org/model-{i % 5}", provider="aws",
            instance_type=("g5.xlarge", "g6.xlarge", "g6e.2xlarge", "p4d.24xlarge")[i % 4],
            region="us-east-1", status=statuses[i % 5], exit_code=0 if i % 5 < 3 else 1,
            started_at=now - timedelta(minutes=i * 60 * 24 * 60 / max(count, 1)),
            duration_seconds=300 + i % 600, cost_usd=0.05 + (i % 17) * 0.1,
            phases={"provision": 30.0, "boot": 90.0, "server_start": 200.0, "suite": 400.0}),
            path=db)
    return time.perf_counter() - started


def stats(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return f"median {1000 * statistics.median(ordered):7.1f} ms   p90 {1000 * p90:7.1f} ms"


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="synthetic runs in the history")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    from ephemera.results.history import GROUPINGS, count_runs, summarize

    with tempfile.TemporaryDirectory(prefix="ephemera-bench-cost-") as tmp:
        db = Path(tmp) / "history.sqlite3"
        write_s = fill(db, args.n)
        assert count_runs(path=db) == args.n
        print(f"history: {args.n} runs in {db}")
        print(f"  writing them one run at a time: {write_s:.2f} s "
              f"({1000 * write_s / args.n:.2f} ms per run)")
        print("in-process summarize(since=30 days):")
        for by in GROUPINGS:
            samples = timed(lambda by=by: summarize(30 * 86400, by, path=db), args.repeat)
            print(f"  --by {by:<9} {stats(samples)}")
        env = {**os.environ, "EPHEMERA_HISTORY_DB": str(db),
               "EPHEMERA_CONFIG": str(Path(tmp) / "none.toml")}
        cmd = ephemera_command()

        def run(argv: list[str]) -> None:
            subprocess.run(cmd + argv, env=env, check=True, stdout=subprocess.DEVNULL)

        print("end to end (subprocess, interpreter start-up included):")
        for argv in (["cost", "--by", "job", "--json"], ["cost", "--by", "day", "--since", "all"],
                     ["--help"]):
            samples = timed(lambda argv=argv: run(argv), args.repeat)
            print(f"  ephemera {' '.join(argv):<34} {stats(samples)}")


if __name__ == "__main__":
    main()
