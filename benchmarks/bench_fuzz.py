"""Fuzz every input reader for longer than CI does, and say what turned up.

Runs tests/test_hostile_*.py under hypothesis's "long" profile (tests/conftest.py)
with EXAMPLES inputs per property instead of CI's fixed handful, each example still
held to the readers' time and memory bounds. Prints, per property, how many inputs
it tried (passing, invalid, failing) and how long it took, then every failure with
its smallest failing input; the full pytest log is kept for replaying them.

    .venv/bin/python benchmarks/bench_fuzz.py [--examples 1000] [--seed N] [-k EXPR] [FILES...]

Exit status: 0 when every property held, 1 when something was found.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATS = re.compile(r"^\s*- (\d+) passing, (\d+) failing, and (\d+) invalid test cases", re.M)
PHASE_TIME = re.compile(r"^\s*- during \w+ phase \(([\d.]+) seconds\)", re.M)
FAILED = re.compile(r"^FAILED (\S+?)(?: - (.*))?$", re.M)
FAILING_CASE = re.compile(r"(?:Falsifying example|Failing test case): (test_\w+)\((.*?)\n[\s|]*\)",
                          re.S)


@dataclass
class Property:
    name: str
    passing: int = 0
    failing: int = 0
    invalid: int = 0
    seconds: float = 0.0

    @property
    def tried(self) -> int:
        return self.passing + self.failing + self.invalid


def parse_statistics(log: str) -> list[Property]:
    """The per-property blocks of --hypothesis-show-statistics."""
    section = log.split("Hypothesis Statistics", 1)[-1] if "Hypothesis Statistics" in log else ""
    found: list[Property] = []
    for block in re.split(r"^(?=tests/\S+::\S+:\s*$)", section, flags=re.M):
        header = block.strip().splitlines()[0] if block.strip() else ""
        if "::" not in header:
            continue
        path, test = header.rstrip(":").split("::", 1)
        prop = Property(f"{Path(path).stem.removeprefix('test_hostile_')}: {test}")
        for passing, failing, invalid in STATS.findall(block):
            prop.passing += int(passing)
            prop.failing += int(failing)
            prop.invalid += int(invalid)
        prop.seconds = sum(float(s) for s in PHASE_TIME.findall(block))
        found.append(prop)
    return found


def run(files: list[str], examples: int, seed: str | None, expr: str | None,
        log_path: Path) -> tuple[int, str, float]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "long", "EPHEMERA_FUZZ_EXAMPLES": str(examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=short",
           "--hypothesis-show-statistics", *files]
    if seed is not None:
        cmd.append(f"--hypothesis-seed={seed}")
    if expr:
        cmd += ["-k", expr]
    start = time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, log_path.read_text(errors="replace"), time.perf_counter() - start


def report(props: list[Property], log: str, code: int, seconds: float, log_path: Path) -> None:
    width = max([len(p.name) for p in props] + [8])
    print(f"{'property':<{width}}  {'tried':>7} {'passing':>7} {'invalid':>7} {'failing':>7} "
          f"{'seconds':>8}")
    for p in props:
        print(f"{p.name:<{width}}  {p.tried:>7} {p.passing:>7} {p.invalid:>7} {p.failing:>7} "
              f"{p.seconds:>8.1f}")
    total = sum(p.tried for p in props)
    print(f"\n{total} inputs tried by {len(props)} properties in {seconds:.0f}s "
          f"({total / max(seconds, 1e-9):.0f} per second)")
    failures = FAILED.findall(log)
    if not failures and code == 0:
        print("found: nothing - every reader returned a value or its typed error within bounds")
        return
    print(f"found: {len(failures)} failing test(s)" + ("" if failures else f" (pytest exit {code})"))
    cases: dict[str, list[str]] = {}
    for name, args in FAILING_CASE.findall(log):
        text = " ".join(line.strip(" |") for line in args.splitlines()).strip()
        if text not in cases.setdefault(name, []):
            cases[name].append(text)
    for test, message in failures:
        name = test.split("::")[-1].split("[")[0]
        print(f"\n- {test}\n  {message or ''}".rstrip())
        for case in cases.get(name, []):
            print(f"  failing input: {name}({case[:600]})")
    print(f"\nfull log (tracebacks, reproduce_failure blobs): {log_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000, help="inputs per property (default 1000)")
    parser.add_argument("--seed", help="hypothesis seed, to repeat a run (default: random)")
    parser.add_argument("-k", dest="expr", help="only the tests pytest's -k selects")
    parser.add_argument("--log", type=Path, help="where to keep the pytest log")
    parser.add_argument("files", nargs="*", help="test files (default: tests/test_hostile_*.py)")
    args = parser.parse_args()
    files = args.files or sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_hostile_*.py"))
    log_path = args.log or Path(tempfile.mkdtemp(prefix="ephemera-fuzz-")) / "pytest.log"
    print(f"fuzzing {len(files)} files, {args.examples} examples per property"
          + (f", seed {args.seed}" if args.seed else "") + " ...", flush=True)
    code, log, seconds = run(files, args.examples, args.seed, args.expr, log_path)
    report(parse_statistics(log), log, code, seconds, log_path)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
