"""Planning cases with clear answers, over the built-in AWS catalog and small CSVs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ephemera.catalog import builtin_aws_catalog
from ephemera.errors import NoFittingOfferError
from ephemera.job import Job
from ephemera.plan import make_plan
from ephemera.provider import Offer

REF = Path(__file__).parent / "data" / "reference-models"
HEADER = "provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour\n"
from tests.model_configs import QWEN3_32B, QWEN25_72B  # noqa: E402


def job(model: str, **kw) -> Job:
    resources = kw.pop("resources", {})
    server = kw.pop("server", {})
    return Job.model_validate({
        "name": "t", "image": "vllm/vllm-openai", "suite": {"command": "pytest"},
        "model": {"id": model, **kw}, "resources": resources, "server": server,
        "timeout": kw.pop("timeout", "30m")})


def model_dir(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def reasons(err: NoFittingOfferError) -> dict[str, str]:
    return {r.offer.instance_type: r.reason for r in err.rejected}


AWS = builtin_aws_catalog()
LLAMA = str(REF / "Llama-3.1-8B-Instruct")


def test_8b_goes_to_the_cheapest_gpu_that_holds_it():
    plan = make_plan(job(LLAMA), AWS)
    assert plan.offer.instance_type == "g6.xlarge" and plan.offer.gpu == "L4"
    assert plan.tensor_parallel_size == 1
    assert plan.expected_cost_usd == pytest.approx(0.8048 / 2)
    t4 = {r.offer.instance_type: r.reason for r in plan.rejected}["g4dn.xlarge"]
    assert t4.startswith("Weights 14.99 GiB per GPU exceed the 14.2 GiB budget")
    assert [c.offer.price_per_hour for c in plan.runners_up] == sorted(
        c.offer.price_per_hour for c in plan.runners_up)


def test_context_too_long_for_the_cheapest_gpu_moves_up():
    plan = make_plan(job(LLAMA, max_model_len=32768), AWS)
    assert plan.offer.instance_type == "g6e.2xlarge"   # L40S
    reason = {r.offer.instance_type: r.reason for r in plan.rejected}["g6.xlarge"]
    assert "one 32768-token request needs 4.00 GiB" in reason
    assert "only 3.5" in reason


def test_model_too_large_for_one_gpu_uses_tensor_parallelism(tmp_path):
    plan = make_plan(job(model_dir(tmp_path, QWEN25_72B)), AWS)
    assert plan.offer.instance_type == "g6e.12xlarge"  # 4 x L40S, cheapest that holds 135 GiB
    assert plan.tensor_parallel_size == 4
    assert plan.estimate.weights_gib_per_gpu == pytest.approx(33.98, rel=0.02)
    single = {r.offer.instance_type: r.reason for r in plan.rejected}["p5.4xlarge"]
    assert "exceed" in single


def test_qwen25_72b_tp4_on_a100_40gb_does_not_fit(tmp_path):
    p4d = [o for o in AWS if o.instance_type == "p4d.24xlarge"]
    model = model_dir(tmp_path, QWEN25_72B)
    forced = job(model, server={"tensor_parallel_size": 4})
    with pytest.raises(NoFittingOfferError) as info:
        make_plan(forced, p4d)
    reason = reasons(info.value)["p4d.24xlarge"]
    assert reason.startswith("With tensor parallelism 4, weights 33.")
    assert "exceed the 35.6 GiB budget" in reason and "activation peak" in reason
    # Left free, the planner uses all eight GPUs of the same machine.
    assert make_plan(job(model), p4d).tensor_parallel_size == 8


def test_price_cap_excludes_everything():
    with pytest.raises(NoFittingOfferError) as info:
        make_plan(job(LLAMA, resources={"max_price_per_hour": 0.5}), AWS)
    assert len(info.value.rejected) == len(AWS)
    assert all("above the cap of $0.5/h" in r.reason for r in info.value.rejected)
    assert "nothing was launched" in info.value.message
    assert info.value.exit_code == 2


def test_moe_total_parameters_decide_the_gpu():
    plan = make_plan(job(str(REF / "Qwen3-30B-A3B")), AWS)
    assert plan.estimate.active_parameters < 4e9 < 30e9 < plan.estimate.parameters
    # 3B active would fit on one L4; 57 GiB of experts need four A10Gs.
    assert plan.offer.instance_type == "g5.12xlarge" and plan.tensor_parallel_size == 4
    rejected = {r.offer.instance_type: r.reason for r in plan.rejected}
    assert "Weights 56.88 GiB per GPU exceed" in rejected["g6e.2xlarge"]


def test_awq_checkpoint_fits_the_cheapest_t4():
    plan = make_plan(job(str(REF / "Qwen3-8B-AWQ")), AWS)
    assert plan.offer.instance_type == "g4dn.xlarge"


def test_llama_70b_fp8_never_fits_one_h100(tmp_path):
    cfg = json.loads((REF / "Llama-3.1-8B-Instruct" / "config.json").read_text())
    cfg.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
               num_attention_heads=64)
    h100 = [o for o in AWS if o.instance_type.startswith("p5")]
    plan = make_plan(job(model_dir(tmp_path, cfg), precision="fp8"), h100)
    assert plan.offer.instance_type == "p5.48xlarge" and plan.tensor_parallel_size == 2
    assert "Weights 67.7" in plan.rejected[0].reason


def test_qwen3_32b_32k_context_not_on_one_h100(tmp_path):
    h100 = [o for o in AWS if o.instance_type == "p5.4xlarge"]
    with pytest.raises(NoFittingOfferError) as info:
        make_plan(job(model_dir(tmp_path, QWEN3_32B), max_model_len=32768), h100)
    reason = reasons(info.value)["p5.4xlarge"]
    assert "left for the KV cache, but one 32768-token request needs 8.00 GiB" in reason


def test_requested_gpu_region_and_spot_rules():
    assert make_plan(job(LLAMA, resources={"gpu": "L40S"}), AWS).offer.instance_type == "g6e.2xlarge"
    a100 = make_plan(job(LLAMA, resources={"gpu": "A100"}), AWS)
    assert a100.offer.gpu.startswith("A100")
    spot = Offer("aws", "g6.xlarge", "us-east-1", "L4", 1, 22.06, 4, 16, 0.35, spot=True)
    on_demand = make_plan(job(LLAMA), AWS + [spot])
    assert not on_demand.offer.spot
    assert any("spot price" in r.reason for r in on_demand.rejected)
    assert make_plan(job(LLAMA, resources={"spot": True}), AWS + [spot]).offer.spot
    east2 = make_plan(job(LLAMA, max_model_len=1024, resources={"regions": ["us-east-2"]}), AWS)
    assert east2.offer.instance_type == "g5.48xlarge"
    assert any("not among the job's regions (us-east-2)" in r.reason for r in east2.rejected)


def test_ties_go_to_more_headroom():
    small = Offer("x", "small", None, "L4", 1, 22.0, 4, 16, 1.0)
    large = Offer("x", "large", None, "L40S", 1, 44.0, 4, 16, 1.0)
    plan = make_plan(job(LLAMA), [small, large])
    assert plan.offer.instance_type == "large"
    assert plan.runners_up[0].offer.instance_type == "small"


def test_tiny_model_plans_onto_a_cpu_offer():
    cpu = Offer("local", "host", None, None, 0, 0.0, 2, 24.0, 0.0)
    plan = make_plan(job("ephemera/tiny-llama", max_model_len=256), [cpu], provider="local")
    assert plan.offer is cpu and plan.tensor_parallel_size == 1
    assert plan.expected_cost_usd == 0
    small_host = Offer("local", "host", None, None, 0, 0.0, 2, 16.0, 0.0)
    with pytest.raises(NoFittingOfferError, match="CPU-only: weights 14.99 GiB"):
        make_plan(job(LLAMA), [small_host])


def test_provider_and_forced_tp_rejections():
    plan = make_plan(job(LLAMA, server={"tensor_parallel_size": 2}), AWS, provider="aws")
    assert plan.offer.gpu_count >= 2 and plan.tensor_parallel_size == 2
    assert any("tensor_parallel_size 2, but the offer has 1 GPU." in r.reason for r in plan.rejected)
    with pytest.raises(NoFittingOfferError, match="from provider 'aws', but the job uses 'gcp'"):
        make_plan(job(LLAMA), AWS[:2], provider="gcp")
    with pytest.raises(NoFittingOfferError, match="no offers to choose from"):
        make_plan(job(LLAMA), [])


def _write_job(tmp_path: Path, model: str, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: t\nimage: vllm/vllm-openai\nmodel:\n  id: {model}\n"
                    f"suite:\n  command: pytest\n{extra}")
    return path


@pytest.mark.timeout(120)
def test_plan_command_with_a_catalog_of_an_uninstalled_provider(tmp_path):
    catalog = tmp_path / "cat.csv"
    catalog.write_text(HEADER + "lambda,gpu_1x_a10,us-tx-1,A10,1,22.0,30,200,0.75\n"
                       "lambda,gpu_1x_h100,us-tx-1,H100,1,79.18,26,200,2.49\n")
    jobfile = _write_job(tmp_path, LLAMA)
    run = [sys.executable, "-m", "ephemera", "plan", str(jobfile), "--catalog", str(catalog),
           "--provider", "lambda"]
    out = subprocess.run(run + ["--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["offer"]["instance_type"] == "gpu_1x_a10" and doc["offer"]["gpu"] == "A10"
    assert set(doc["offer"]) >= {"instance_type", "gpu", "gpu_count", "price_per_hour", "region"}
    assert doc["tensor_parallel_size"] == 1 and doc["estimate"]["parameters"] > 8e9
    assert doc["runners_up"][0]["offer"]["instance_type"] == "gpu_1x_h100"
    human = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "lambda/gpu_1x_a10" in human.stdout

    capped = _write_job(tmp_path, LLAMA, "resources:\n  max_price_per_hour: 0.1\n")
    fail = subprocess.run([sys.executable, "-m", "ephemera", "plan", str(capped), "--catalog",
                           str(catalog), "--provider", "lambda", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert fail.returncode == 2
    assert "above the cap" in fail.stderr and "nothing was launched" in fail.stderr
    assert json.loads(fail.stdout)["fits"] is False
