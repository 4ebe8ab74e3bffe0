"""A cold user's AWS dry run: no credentials, no network, nothing launched. The plan
comes from the built-in price catalog, the model's shape from its config.json."""

from __future__ import annotations

import json
import shutil

from tests.runlib import REPO, ephemera, run_env

MODELS = REPO / "tests" / "data" / "reference-models"


def aws_job(tmp_path, model: str, extra: str = "") -> str:
    shutil.copytree(MODELS / model, tmp_path / model)
    shutil.copytree(REPO / "jobs" / "suites", tmp_path / "suites")
    job = tmp_path / "aws.yaml"
    job.write_text(f"""
name: aws-dry
model: {{id: ./{model}, precision: bf16, max_model_len: 8192}}
image: vllm/vllm-openai:v0.10.1.1
suite: {{files: [suites/openai-api], command: python3 -m pytest suites/openai-api, timeout: 20m}}
resources: {{provider: aws, regions: [us-east-1]{extra}}}
timeout: 45m
""")
    return str(job)


def env_without_aws(tmp_path) -> dict[str, str]:
    env = run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                  EPHEMERA_CACHE_DIR=str(tmp_path / "cache"), EPHEMERA_CONFIG=str(tmp_path / "none.toml"),
                  HF_HUB_OFFLINE="1", AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
                  AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    return env


def test_aws_dry_run_needs_no_credentials(tmp_path):
    env = env_without_aws(tmp_path)
    result = ephemera("run", aws_job(tmp_path, "Qwen3-8B"), "--dry-run", "--json", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "dry-run" and out["provider"] == "aws"
    offer = out["plan"]["offer"]
    # Qwen3-8B bf16 (~15.3 GiB of weights) at 8k context: a 24 GB-class GPU is the cheapest fit.
    assert offer["gpu"] in ("L4", "A10G") and offer["gpu_count"] == 1
    assert offer["region"] == "us-east-1"
    assert out["server_command"].startswith("vllm serve ")
    assert "--max-model-len 8192" in out["server_command"] and "--dtype bfloat16" in out["server_command"]
    assert "--tensor-parallel-size 1" in out["server_command"]
    assert not (tmp_path / "state" / "runs").exists()


def test_aws_dry_run_with_a_price_cap_that_excludes_everything(tmp_path):
    env = env_without_aws(tmp_path)
    result = ephemera("run", aws_job(tmp_path, "Qwen3-8B", ", max_price_per_hour: 0.1"), "--dry-run",
                      env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "0.1" in result.stderr and "Traceback" not in result.stderr
