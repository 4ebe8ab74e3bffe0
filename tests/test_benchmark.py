"""The serving benchmark: its command line in both forms, and its JSON read into figures
(strictly: a result that is not usable is the benchmark's problem, not a crash)."""

from __future__ import annotations

import json
import shlex

import pytest

from ephemera.results.benchmark import (
    BenchmarkError,
    bench_arguments,
    bench_command,
    metrics_from,
    read_result,
    server_model,
)
from ephemera.spec.job import BenchmarkSpec

VLLM_RESULT = {
    "duration": 0.4, "completed": 20, "failed": 0, "num_prompts": 20,
    "request_throughput": 50.0, "output_throughput": 800.0, "total_token_throughput": 2400.0,
    "mean_ttft_ms": 10.0, "median_ttft_ms": 9.0, "p50_ttft_ms": 9.5, "p90_ttft_ms": 15.0,
    "p99_ttft_ms": 20.0, "mean_tpot_ms": 1.0, "p90_tpot_ms": 1.5, "mean_itl_ms": 1.1,
    "p90_itl_ms": 1.6, "mean_e2el_ms": 30.0, "median_e2el_ms": 29.0, "p90_e2el_ms": 40.0,
    "p99_e2el_ms": 45.0,
}


def test_arguments_for_a_random_dataset_with_a_fixed_seed():
    spec = BenchmarkSpec(requests=30, concurrency=4, input_len=32, output_len=16, warmup=2, seed=7)
    args = bench_arguments(spec, port=8123, model="tiny", tokenizer="/run/model", result_dir="/run/b")
    text = " ".join(args)
    for part in ("--backend openai-chat", "--endpoint /v1/chat/completions", "--port 8123",
                 "--num-prompts 30", "--seed 7", "--max-concurrency 4", "--num-warmups 2",
                 "--dataset-name random", "--random-input-len 32", "--random-output-len 16",
                 "--tokenizer /run/model", "--result-dir /run/b", "--result-filename benchmark.json",
                 "--percentile-metrics ttft,tpot,itl,e2el", "--metric-percentiles 50,90,99"):
        assert part in text, part
    assert "--request-rate" not in text


def test_dataset_file_and_completions_endpoint():
    spec = BenchmarkSpec(dataset={"path": "data/prompts.jsonl"}, endpoint="completions",
                         output_len=8, request_rate=2.5)
    text = " ".join(bench_arguments(spec, port=1, model="m", tokenizer=None, result_dir="/r"))
    assert "--dataset-name custom --dataset-path data/prompts.jsonl --custom-output-len 8" in text
    assert "--backend openai --endpoint /v1/completions" in text and "--request-rate 2.5" in text


def test_console_script_on_gpu_images_and_module_on_the_cpu_build():
    assert bench_command(["--port", "1"], python=None) == "vllm bench serve --port 1"
    cpu = shlex.split(bench_command(["--port", "1"], python="/venv/bin/python"))
    assert cpu[:2] == ["/venv/bin/python", "-c"] and "vllm.benchmarks.serve" in cpu[2]
    assert cpu[3:] == ["--port", "1"]


def test_server_model_from_both_launchers():
    assert server_model(["vllm", "serve", "Qwen/Qwen3-4B", "--port", "1"]) == "Qwen/Qwen3-4B"
    assert server_model(["python3", "-m", "vllm.entrypoints.openai.api_server", "--model",
                         "/run/model"]) == "/run/model"


def test_figures_from_vllm_json():
    m = metrics_from(VLLM_RESULT)
    assert m["ttft_p90_ms"] == 15.0 and m["ttft_p50_ms"] == 9.5 and m["e2e_p90_ms"] == 40.0
    assert m["e2e_p50_ms"] == 29.0   # median when no p50 was asked for
    assert m["output_tokens_per_s"] == 800.0 and m["requests_per_s"] == 50.0
    assert m["failed_requests"] == 0 and m["completed_requests"] == 20


def test_bad_results_are_benchmark_errors(tmp_path):
    path = tmp_path / "benchmark.json"
    for text, why in (("[1, 2]", "not an object"), ('{"p90_ttft_ms": NaN}', "not a readable"),
                      ('{"p90_ttft_ms": "fast"}', "none of the expected"), ("{", "not a readable")):
        path.write_text(text)
        with pytest.raises(BenchmarkError, match=why):
            read_result(path)
    with pytest.raises(BenchmarkError, match="no result file"):
        read_result(tmp_path / "missing.json")
    path.write_text(json.dumps({**VLLM_RESULT, "p99_ttft_ms": -1, "failed": True}))
    figures = read_result(path)
    assert "ttft_p99_ms" not in figures and figures["failed_requests"] == 0.0
