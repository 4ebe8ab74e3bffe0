"""Planning cases with clear answers, over the built-in AWS catalog and small CSVs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ephemera.errors import NoFittingOfferError
from ephemera.provider import Offer
from ephemera.sizing.catalog import builtin_aws_catalog
from ephemera.sizing.plan import DISK_FLOOR_GIB, DISK_SLACK_GIB, IMAGE_DISK_GIB, make_plan
from ephemera.spec.job import Job

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
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def reasons(err: NoFittingOfferError) -> dict[str, str]:
    return {r.offer.instance_type: r.reason for r in err.rejected}


def reasons_of(plan) -> dict[str, str]:
    return {r.offer.instance_type: r.reason for r in plan.rejected}


AWS = builtin_aws_catalog()
LLAMA = str(REF / "Llama-3.1-8B-Instruct")


def test_8b_goes_to_the_cheapest_gpu_that_holds_it():
    plan = make_plan(job(LLAMA), AWS)
    assert plan.offer.instance_type == "g6.xlarge" and plan.offer.gpu == "L4"
    assert plan.tensor_parallel_size == 1
    assert plan.expected_cost_usd == pytest.approx(0.8048 / 2)
    t4 = {r.offer.instance_type: r.reason for r in plan.rejected}["g4dn.xlarge"]
    assert t4.startswith("bf16 needs compute capability 8.0 or newer")
    # In fp16 the T4 could run it, but its 14.80 usable GiB do not hold the weights.
    fp16 = make_plan(job(LLAMA, precision="fp16"), AWS)
    t4 = {r.offer.instance_type: r.reason for r in fp16.rejected}["g4dn.xlarge"]
    assert t4.startswith("Weights 14.99 GiB per GPU exceed the 13.3 GiB budget (0.9 x 14.8 GiB)")
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
    # precision int4 passes no --dtype: vLLM runs the checkpoint's float16 on the T4.
    plan = make_plan(job(str(REF / "Qwen3-8B-AWQ"), precision="int4"), AWS)
    assert plan.offer.instance_type == "g4dn.xlarge" and plan.notes == []
    # precision bf16 passes --dtype bfloat16, which the T4 (7.5) cannot run.
    bf16 = make_plan(job(str(REF / "Qwen3-8B-AWQ")), AWS)
    assert bf16.offer.instance_type == "g6.xlarge"
    assert reasons_of(bf16)["g4dn.xlarge"].startswith(
        "bf16 needs compute capability 8.0 or newer; vLLM refuses --dtype bfloat16 on T4 "
        "(compute capability 7.5)")


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


# ----------------------------------------------------------------------------- GPU capability

T4 = Offer("aws", "g4dn.xlarge", "us-west-2", "T4", 1, 14.80, 4, 16, 0.526, compute_capability=7.5)
V100 = Offer("aws", "p3.2xlarge", "us-east-1", "V100", 1, 15.57, 8, 61, 0.30)  # capability from the name
A10G = Offer("aws", "g5.xlarge", "us-east-1", "A10G", 1, 22.06, 4, 16, 1.006, compute_capability=8.6)
L4 = Offer("aws", "g6.xlarge", "us-east-1", "L4", 1, 22.06, 4, 16, 1.10, compute_capability=8.9)
GPUS = [T4, V100, A10G, L4]
QWEN3_8B = REF / "Qwen3-8B"


def with_quantization(tmp_path: Path, quantization_config: dict) -> str:
    cfg = json.loads((QWEN3_8B / "config.json").read_text())
    return model_dir(tmp_path, {**cfg, "quantization_config": quantization_config})


def test_v100_is_refused_for_any_job_and_named_for_the_ami():
    plan = make_plan(job(str(QWEN3_8B), precision="fp16"), GPUS)
    assert plan.offer is A10G
    assert reasons_of(plan)["p3.2xlarge"] == (
        "V100 (compute capability 7.0) is not supported by the vLLM images, nor by AWS's "
        "default Deep Learning AMI (no P3 support): vLLM needs compute capability 7.5 or newer.")
    # fp16 runs on a T4; this model's 15 GiB of weights do not fit its memory.
    assert reasons_of(plan)["g4dn.xlarge"].startswith("Weights 15.")
    elsewhere = Offer("ssh", "ssh:host", None, "Tesla V100-SXM2-16GB", 1, 15.57, 8, 61, 0.0)
    with pytest.raises(NoFittingOfferError) as info:
        make_plan(job("1B", precision="fp16"), [elsewhere])
    assert reasons(info.value)["ssh:host"].startswith(
        "Tesla V100-SXM2-16GB (compute capability 7.0) is not supported by the vLLM images: ")


def test_fp8_needs_8_0_and_runs_weight_only_below_8_9(tmp_path):
    # Online fp8 quantisation (precision fp8 = --quantization fp8) of a bf16 checkpoint.
    plan = make_plan(job(str(QWEN3_8B), precision="fp8"), GPUS)
    assert plan.offer is A10G
    [note] = plan.notes
    assert note.startswith("A10G (compute capability 8.6) has no FP8 compute: vLLM runs the "
                           "FP8 weights weight-only (W8A16) through its FP8 Marlin kernel")
    assert reasons_of(plan)["g4dn.xlarge"] == (
        "fp8 quantization needs compute capability 8.0 or newer in vLLM (FP8 weights run "
        "weight-only through FP8 Marlin from 8.0, with FP8 compute from 8.9); this is T4 "
        "(compute capability 7.5).")
    # L4 computes in FP8: no note there.
    assert make_plan(job(str(QWEN3_8B), precision="fp8"), [L4]).notes == []
    # The same from an FP8 checkpoint, also when only its shape is given.
    fp8_dir = with_quantization(tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    from_checkpoint = make_plan(job(fp8_dir, precision="fp8"), GPUS)
    assert from_checkpoint.offer is A10G and "FP8 Marlin" in from_checkpoint.notes[0]
    from ephemera.sizing.estimate import analyse
    from ephemera.sizing.modelconfig import load_model

    shape = analyse(load_model(fp8_dir), precision="fp8")
    assert "FP8 Marlin" in make_plan(job(fp8_dir, precision="fp8"), GPUS, shape=shape).notes[0]
    assert plan.to_dict()["notes"] == plan.notes


def test_quantization_methods_have_their_own_minimum(tmp_path):
    modelopt = with_quantization(tmp_path / "a", {"quant_method": "modelopt", "quant_algo": "FP8"})
    plan = make_plan(job(modelopt, precision="fp16"), GPUS)
    assert plan.offer is L4
    assert reasons_of(plan)["g5.xlarge"].startswith(
        "modelopt FP8 quantization needs compute capability 8.9 or newer in vLLM; this is A10G")
    int8 = with_quantization(tmp_path / "b", {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 8, "type": "int"},
                    "input_activations": {"num_bits": 8, "type": "int"}}}})
    assert make_plan(job(int8, precision="int8"), GPUS).offer is T4   # W8A8 int8: 7.5
    w4a16 = with_quantization(tmp_path / "c", {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 4, "type": "int", "group_size": 128}}}})
    plan = make_plan(job(w4a16, precision="int4"), GPUS)
    assert plan.offer is A10G
    assert "compressed-tensors quantization needs compute capability 8.0" in reasons_of(plan)["g4dn.xlarge"]
    # A forced --quantization awq_marlin (8.0) rules out the T4 an AWQ checkpoint would use.
    awq = str(REF / "Qwen3-8B-AWQ")
    assert make_plan(job(awq, precision="int4"), GPUS).offer is T4
    forced = make_plan(job(awq, precision="int4", quantization="awq_marlin"), GPUS)
    assert forced.offer is A10G and "awq_marlin quantization needs" in reasons_of(forced)["g4dn.xlarge"]


def test_dtype_from_the_command_line_decides():
    small = "1B"
    assert make_plan(job(small), [T4, L4]).offer is L4
    # server.args come last on vLLM's command line: their --dtype wins over the precision.
    half = make_plan(job(small, server={"args": ["--dtype half"]}), [T4, L4])
    assert half.offer is T4
    assert make_plan(job(small, server={"args": ["--dtype=bfloat16"]}, precision="fp16"),
                     [T4, L4]).offer is L4


def test_unknown_capability_is_kept_with_a_note():
    odd = Offer("x", "odd", None, "Accel X1", 1, 40.0, 8, 64, 0.1)
    plan = make_plan(job("1B"), [odd, L4])
    assert plan.offer is odd
    assert plan.notes == ["the compute capability of Accel X1 is unknown: whether vLLM runs "
                          "bf16 on it was not checked"]
    assert plan.to_dict()["offer"]["compute_capability"] is None
    assert make_plan(job("1B", precision="fp16"), [odd]).notes == []


# ----------------------------------------------------------------------------- disk


def test_disk_is_sized_from_the_image_and_the_model(tmp_path):
    small = make_plan(job(str(REF / "Qwen3-4B-Instruct-2507")), AWS)
    assert small.checkpoint_gib == pytest.approx(7.6, abs=0.1)
    assert small.disk_gib == DISK_FLOOR_GIB == 50          # 30 + 7.6 + 10 is below the floor
    big = make_plan(job(model_dir(tmp_path, QWEN25_72B)), AWS)
    assert big.checkpoint_gib == pytest.approx(135.4, abs=1)
    assert big.disk_gib == math.ceil(IMAGE_DISK_GIB + big.checkpoint_gib + DISK_SLACK_GIB)
    assert big.to_dict()["disk_gib"] == big.disk_gib
    # Quantised at load time: the download is the 16-bit checkpoint, not the fp8 weights.
    fp8 = make_plan(job(model_dir(tmp_path / "fp8", QWEN25_72B), precision="fp8"), AWS)
    assert fp8.estimate.weights_gib < 80 and fp8.checkpoint_gib == pytest.approx(135.4, abs=1)
    # An AWQ checkpoint downloads its packed 4-bit files.
    awq = make_plan(job(str(REF / "Qwen3-8B-AWQ"), precision="int4"), AWS)
    assert awq.checkpoint_gib == pytest.approx(awq.estimate.weights_gib, rel=0.01)
    assert awq.checkpoint_gib < 7
    # resources.disk_gib wins; image "host" needs no room for an image.
    assert make_plan(job(str(QWEN3_8B), resources={"disk_gib": 300}), AWS).disk_gib == 300
    host = Job.model_validate({**job(model_dir(tmp_path / "h", QWEN25_72B)).model_dump(),
                               "image": "host"})
    assert make_plan(host, AWS).disk_gib == math.ceil(big.checkpoint_gib + DISK_SLACK_GIB)


# ----------------------------------------------------------------------------- the example AWS job

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "jobs" / "qwen3-4b-aws.yaml"
AWS_LIKE = Path(__file__).parent / "data" / "aws-like"
TIERS_JOB = AWS_LIKE / "qwen3-4b-tiers.yaml"
TIERS_CATALOG = AWS_LIKE / "catalog-t4-l4-a10g-l40s.csv"
BF16_ON_T4 = ("bf16 needs compute capability 8.0 or newer; vLLM refuses --dtype bfloat16 on T4 "
              "(compute capability 7.5); precision fp16 runs there.")
ON_DEMAND_ONLY = "This is a spot price, but the job asks for on-demand (resources.spot is false)."


def plan_cli(*args: str | Path, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "ephemera", "plan", *map(str, args), "--json"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_TOKEN": "hf_test", **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def rejected_by_offer(doc: dict) -> dict[tuple[str, bool], str]:
    return {(r["offer"]["instance_type"], r["offer"]["spot"]): r["reason"] for r in doc["rejected"]}


def test_tiers_test_job_is_the_example_job_with_local_models():
    from ephemera.spec.jobfile import load_job

    env = {"HF_TOKEN": "hf_test"}
    for tier in ("smoke", "full", "release"):
        example = load_job(EXAMPLE, tier=tier, env=env).job.model_dump(mode="json")
        local = load_job(TIERS_JOB, tier=tier, env=env).job.model_dump(mode="json")
        for doc in (example, local):   # every tier is compared merged, as it runs
            doc["model"].pop("id")
            doc["suite"].pop("files")
            doc.pop("tiers")
        assert local == example, tier


@pytest.mark.timeout(180)
def test_example_job_tiers_on_a_t4_l4_a10g_l40s_catalog():
    plans = {tier: plan_cli(TIERS_JOB, "--tier", tier, "--catalog", TIERS_CATALOG)
             for tier in ("smoke", "full", "release")}
    offers = {t: (p["offer"]["instance_type"], p["offer"]["gpu"], p["offer"]["spot"],
                  p["offer"]["compute_capability"]) for t, p in plans.items()}
    # smoke: AWQ int4 (vLLM's awq kernel needs 7.5; fp16 from the checkpoint): the spot T4.
    assert offers["smoke"] == ("g4dn.xlarge", "T4", True, 7.5)
    assert rejected_by_offer(plans["smoke"]) == {("g6e.2xlarge", False): (
        "The price $2.242/h is above the cap of $1.2/h (resources.max_price_per_hour).")}
    # full: bf16 rules out both T4 prices; the spot L4 is next.
    assert offers["full"] == ("g6.xlarge", "L4", True, 8.9)
    assert rejected_by_offer(plans["full"]) == {("g4dn.xlarge", False): BF16_ON_T4,
                                                ("g4dn.xlarge", True): BF16_ON_T4}
    # release: on-demand only, bf16, 32k context: the on-demand L4.
    assert offers["release"] == ("g6.xlarge", "L4", False, 8.9)
    assert rejected_by_offer(plans["release"]) == {
        ("g4dn.xlarge", False): BF16_ON_T4, **{(kind, True): ON_DEMAND_ONLY for kind in (
            "g4dn.xlarge", "g6.xlarge", "g5.xlarge", "g6e.2xlarge")}}
    for plan in plans.values():
        assert plan["notes"] == [] and plan["disk_gib"] == 50


def fake_hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding only the example job's two config.json files (read
    with the hub switched off)."""
    models = {"Qwen/Qwen3-4B-Instruct-2507": REF / "Qwen3-4B-Instruct-2507",
              "Qwen/Qwen3-4B-AWQ": AWS_LIKE / "Qwen3-4B-AWQ"}
    commit = "0" * 40
    for repo, source in models.items():
        base = root / "hf" / f"models--{repo.replace('/', '--')}"
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(commit)
        (base / "snapshots" / commit).mkdir(parents=True)
        shutil.copy(source / "config.json", base / "snapshots" / commit / "config.json")
    return root


@pytest.mark.timeout(180)
def test_example_job_plans_every_tier_onto_a_gpu_vllm_can_run(tmp_path):
    env = {"EPHEMERA_CACHE_DIR": str(fake_hub_cache(tmp_path / "cache")), "HF_HUB_OFFLINE": "1"}
    chosen = {}
    for tier in ("smoke", "full", "release"):
        doc = plan_cli(EXAMPLE, "--tier", tier, env=env)
        offer = doc["offer"]
        chosen[tier] = offer["instance_type"]
        if doc["job"]["model"]["precision"] == "bf16":
            assert offer["compute_capability"] >= 8.0, (tier, offer)
            assert rejected_by_offer(doc)[("g4dn.xlarge", False)] == BF16_ON_T4
        assert offer["compute_capability"] >= 7.5 and offer["gpu"] != "V100"
        assert doc["disk_gib"] == 50
    assert chosen == {"smoke": "g4dn.xlarge", "full": "g6.xlarge", "release": "g6.xlarge"}
    # The release tier's cap lets the p3s in: they are refused for their GPU.
    release = rejected_by_offer(plan_cli(EXAMPLE, "--tier", "release", env=env))
    assert release[("p3.2xlarge", False)].startswith(
        "V100 (compute capability 7.0) is not supported by the vLLM images, nor by AWS's "
        "default Deep Learning AMI")
