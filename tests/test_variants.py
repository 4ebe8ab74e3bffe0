"""A/B variants: loading with line numbers, placement and its costs, the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ephemera.errors import ConfigError
from ephemera.lifecycle.ab_run import Outcome, exit_code
from ephemera.lifecycle.variants import load_variants, plan_placement
from ephemera.spec.jobfile import JobFileError, load_job

REF = Path(__file__).parent / "data" / "reference-models"
SMALL = str(REF / "Qwen3-4B-Instruct-2507")
MEDIUM = str(REF / "Llama-3.1-8B-Instruct")
LARGE = str(REF / "Qwen3-30B-A3B")
CATALOG = ("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour\n"
           "lambda,gpu_1x_a10,us-tx-1,A10,1,22.0,30,200,0.75\n"
           "lambda,gpu_1x_h100,us-tx-1,H100,1,79.18,26,200,2.49\n")


def write(tmp_path: Path, variants: str, compare: str = "", extra: str = "") -> Path:
    path = tmp_path / "ab.yaml"
    path.write_text(f"name: ab\nimage: vllm/vllm-openai:v0.10.0\nmodel:\n  id: {SMALL}\n"
                    f"  max_model_len: 4096\nsuite:\n  command: pytest\ntimeout: 60m\n{extra}"
                    f"variants:\n{variants}{compare}")
    return path


def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "cat.csv"
    path.write_text(CATALOG)
    return path


def test_each_variant_is_the_job_with_its_overrides(tmp_path):
    path = write(tmp_path, f"  a: {{}}\n  b: {{model: {{id: {MEDIUM}}}, image: vllm/vllm-openai:v0.11.0}}\n",
                 "compare:\n  baseline: b\n")
    variants = load_variants(load_job(path, check_provider=False), check_provider=False)
    assert [v.name for v in variants] == ["b", "a"]           # the baseline first
    b, a = variants
    assert b.job.model.id == MEDIUM and b.job.image.endswith("v0.11.0")
    assert a.job.model.id == SMALL and a.job.model.max_model_len == 4096
    assert (a.job.name, b.job.name) == ("ab-a", "ab-b")       # baselines kept apart
    assert b.compare.baseline == "b" and b.job.compare is None and not b.job.variants


def test_a_bad_variant_is_reported_at_its_line(tmp_path):
    path = write(tmp_path, "  a: {}\n  b:\n    model:\n      precision: int3\n    timeout: soon\n")
    with pytest.raises(JobFileError) as info:
        load_variants(load_job(path, check_provider=False), check_provider=False)
    text = str(info.value)
    assert "ab.yaml:13:18: [variant b] model.precision:" in text
    assert "ab.yaml:14:14: [variant b] timeout:" in text


@pytest.mark.parametrize("variants, compare, message", [
    ("  a: {}\n", "", "give at least two variants"),
    ("  a: {}\n  B: {}\n", "", "variant name 'B'"),
    ("  a: {}\n  b: {tiers: {}}\n", "", "variant 'b' cannot set 'tiers'"),
    ("  a: {}\n  b: {}\n", "compare:\n  baseline: c\n", "compare.baseline: 'c' is not a variant"),
    ("  a: {}\n  b: {}\n", "compare:\n  gates: {e2e_p90_ratio_max: -1}\n", "greater than 0"),
    ("  a: {}\n  b: {}\n", "compare:\n  placement: somewhere\n", "same-machine"),
])
def test_variants_and_compare_are_checked(tmp_path, variants, compare, message):
    with pytest.raises(JobFileError, match=message):
        load_job(write(tmp_path, variants, compare), check_provider=False)


def test_compare_needs_variants(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: j\nimage: x\nmodel: {id: m}\nsuite: {command: c}\ncompare: {}\n")
    with pytest.raises(JobFileError, match="compare: needs a `variants:` section"):
        load_job(path, check_provider=False)


def placement(tmp_path, variants: str, compare: str = ""):
    loaded = load_job(write(tmp_path, variants, compare), check_provider=False)
    return plan_placement(load_variants(loaded, check_provider=False), catalog=catalog(tmp_path),
                          provider_name="lambda")


def test_auto_shares_a_machine_when_one_offer_fits_all_at_no_higher_cost(tmp_path):
    p = placement(tmp_path, f"  a: {{}}\n  b: {{model: {{id: {MEDIUM}}}}}\n")
    assert p.choice == "same-machine" and p.shared.offer.instance_type == "gpu_1x_a10"
    assert p.same_cost_usd == pytest.approx(0.75 * 2) and p.parallel_cost_usd == pytest.approx(0.75 * 2)
    assert p.same_seconds == 7200 and p.parallel_seconds == 3600


def test_auto_runs_in_parallel_when_sharing_the_big_machine_costs_more(tmp_path):
    p = placement(tmp_path, f"  a: {{}}\n  b: {{model: {{id: {LARGE}}}}}\n")
    assert p.plans["a"].offer.instance_type == "gpu_1x_a10"
    assert p.plans["b"].offer.instance_type == "gpu_1x_h100"
    assert p.shared.offer.instance_type == "gpu_1x_h100"
    assert p.choice == "parallel" and p.parallel_cost_usd == pytest.approx(0.75 + 2.49)
    assert p.same_cost_usd == pytest.approx(2 * 2.49) and "cheaper" in p.reason


def test_auto_runs_in_parallel_when_the_deadline_needs_it(tmp_path):
    p = placement(tmp_path, f"  a: {{}}\n  b: {{model: {{id: {MEDIUM}}}}}\n",
                  "compare:\n  deadline: 90m\n")
    assert p.choice == "parallel" and "deadline" in p.reason


def test_same_machine_needs_one_image(tmp_path):
    variants = "  a: {}\n  b: {image: vllm/vllm-openai:v0.11.0}\n"
    assert placement(tmp_path, variants).choice == "parallel"
    with pytest.raises(ConfigError, match="same-machine is not possible: variant b has another image"):
        placement(tmp_path, variants, "compare:\n  placement: same-machine\n")


def test_plan_command_shows_the_choice_and_both_costs(tmp_path):
    path = write(tmp_path, f"  a: {{}}\n  b: {{model: {{id: {LARGE}}}}}\n")
    base = [sys.executable, "-m", "ephemera", "plan", str(path), "--catalog", str(catalog(tmp_path)),
            "--provider", "lambda"]
    human = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert human.returncode == 0, human.stderr
    assert "parallel: one instance per variant, at most $3.2400" in human.stdout
    assert "same-machine: lambda/gpu_1x_h100 for all, one after another, at most $4.9800" in human.stdout
    assert "placement: parallel (cheaper" in human.stdout
    doc = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60).stdout)
    assert doc["placement"] == "parallel" and doc["same_machine"]["expected_cost_usd"] == 4.98


def outcome(name: str, code: int, status: str = "passed") -> Outcome:
    return Outcome(name, f"g-{name}", Path("/nonexistent"), status=status, exit_code=code)


def test_exit_code_of_an_ab_run():
    assert exit_code([outcome("a", 0), outcome("b", 0)], False, None) == 0
    assert exit_code([outcome("a", 0), outcome("b", 0)], True, None) == 1
    assert exit_code([outcome("a", 0), outcome("b", 1, "failed")], False, None) == 1
    assert exit_code([outcome("a", 0), outcome("b", 3, "error")], True, None) == 3
    assert exit_code([outcome("a", 0), outcome("b", 130, "interrupted")], False, None) == 130
    assert exit_code([outcome("a", 5), outcome("b", 130, "interrupted")], False, 2) == 5
    assert exit_code([outcome("a", 0), outcome("b", 0)], False, 15) == 143


def test_the_example_ab_job(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_example_token_value")
    loaded = load_job(Path(__file__).parent.parent / "jobs" / "qwen-ab.yaml", check_provider=False)
    a, b = load_variants(loaded, check_provider=False)
    assert (a.job.model.id, b.job.model.id) == ("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen3-4B-Instruct-2507")
    assert a.job.benchmark == b.job.benchmark and a.job.suite == b.job.suite
    assert b.job.model.served_name == "llm" and a.compare.gates.e2e_p90_ratio_max == 1.1


def test_validate_checks_each_variant_as_a_whole_job(tmp_path):
    path = write(tmp_path, "  a: {}\n  b:\n    model:\n      precision: int3\n")
    out = subprocess.run([sys.executable, "-m", "ephemera", "validate", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout
    assert "ab.yaml:13:18: [variant b] model.precision:" in out.stderr
