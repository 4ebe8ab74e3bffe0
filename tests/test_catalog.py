"""Catalogs: the built-in AWS file, users' CSV files (line-numbered errors), the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ephemera_providers.local import (
    NVIDIA_SMI_FIELDS,
    LocalProvider,
    nvidia_offers,
    parse_nvidia_smi,
)

from ephemera.errors import ConfigError
from ephemera.provider import Offer, OfferRequest
from ephemera.sizing.catalog import (
    BUILTIN_AWS_SOURCE,
    builtin_aws_catalog,
    builtin_aws_offers,
    gpu_capability,
    load_cached_offers,
    load_catalog,
    offer_capability,
    save_cached_offers,
    usable_gib,
)

HEADER = "provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from ephemera.spec.settings import reset_settings

    monkeypatch.setenv("EPHEMERA_CACHE_DIR", str(tmp_path / "cache"))
    reset_settings()
    return tmp_path / "cache"


def test_builtin_catalog_uses_measured_usable_memory():
    offers = {o.instance_type: o for o in builtin_aws_catalog()}
    assert len(offers) == 19
    assert offers["p5.4xlarge"].gpu_memory_gib == 79.18
    assert offers["p4d.24xlarge"].gpu_memory_gib == 39.56 and offers["p4d.24xlarge"].gpu_count == 8
    assert offers["g6e.2xlarge"].gpu_memory_gib == 44.40
    assert offers["g5.xlarge"].gpu_memory_gib == 22.06 and offers["g5.xlarge"].price_per_hour == 1.006
    assert all(o.provider == "aws" and o.price_source == BUILTIN_AWS_SOURCE for o in offers.values())
    # Unmeasured types take the nominal MiB through the same rule: a T4's 15360 MiB
    # (not the 16384 AWS lists) come to 14.80 GiB, as PyTorch sees about 14.6 to 14.8.
    nominal = {"g4dn.xlarge": 15360, "p3.2xlarge": 16160, "g6.xlarge": 22888,
               "p4de.24xlarge": 81920, "p5en.48xlarge": 144384}
    for kind, mib in nominal.items():
        assert offers[kind].gpu_memory_gib == usable_gib(mib), kind
    assert offers["g4dn.xlarge"].gpu_memory_gib == 14.80


def test_builtin_catalog_knows_each_gpus_compute_capability():
    caps = {o.gpu: o.compute_capability for o in builtin_aws_catalog()}
    assert caps == {"T4": 7.5, "A10G": 8.6, "L4": 8.9, "L40S": 8.9, "V100": 7.0, "V100-32GB": 7.0,
                    "A100-40GB": 8.0, "A100-80GB": 8.0, "H100": 9.0, "H200": 9.0}
    assert all(caps[gpu] == gpu_capability(gpu) for gpu in caps)


def test_gpu_capability_from_the_names_drivers_and_clouds_use():
    assert gpu_capability("Tesla T4") == 7.5
    assert gpu_capability("NVIDIA A100-SXM4-80GB") == 8.0
    assert gpu_capability("NVIDIA H100 80GB HBM3") == 9.0
    assert gpu_capability("Tesla V100-SXM2-16GB") == 7.0
    assert gpu_capability("NVIDIA L40S") == 8.9 and gpu_capability("NVIDIA L4") == 8.9
    assert gpu_capability("NVIDIA A10G") == 8.6
    assert gpu_capability("Radeon Instinct") is None and gpu_capability(None) is None
    cpu = Offer("local", "cpu", None, None, 0, 0.0, 2, 8.0, 0.0)
    named = Offer("x", "y", None, "T4", 1, 14.8, 4, 16.0, 0.1)
    assert offer_capability(cpu) is None and offer_capability(named) == 7.5
    assert offer_capability(Offer("x", "y", None, "T4", 1, 14.8, 4, 16.0, 0.1,
                                  compute_capability=8.0)) == 8.0


def test_user_catalog_with_comments_cpu_rows_and_spot(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("# my prices\n" + HEADER.strip() + ",spot\n"
                    "lambda,gpu_1x_a10,us-tx-1,A10,1,22.0,30,200,0.75,false\n"
                    "\n"
                    "local,cpu,,,0,0,2,24,0,no\n"
                    "aws,g5.xlarge,us-east-1,A10G,1,22.06,4,16,0.40,true\n")
    offers = load_catalog(path)
    assert [o.provider for o in offers] == ["lambda", "local", "aws"]
    assert offers[1].cpu_only and offers[1].gpu is None and offers[1].region is None
    assert offers[2].spot and not offers[0].spot
    assert offers[0].price_source == f"catalog file {path}"
    # Without a compute_capability column a known GPU takes its model's.
    assert offers[2].compute_capability == 8.6 and offers[0].compute_capability == 8.6
    assert offers[1].compute_capability is None


def test_user_catalog_compute_capability_column(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(HEADER.strip() + ",compute_capability\n"
                    "lambda,gpu_1x_x,us-tx-1,X1,1,40.0,30,200,0.75,8.9\n"
                    "lambda,gpu_1x_t4,us-tx-1,T4,1,14.8,8,30,0.30,\n"
                    "lambda,gpu_1x_y,us-tx-1,Y1,1,40.0,30,200,0.75,\n")
    offers = load_catalog(path)
    assert [o.compute_capability for o in offers] == [8.9, 7.5, None]


@pytest.mark.parametrize(("body", "message"), [
    ("provider,instance_type\n", "line 1: missing column(s) region"),
    (HEADER.strip() + ",colour\n", "unknown column(s) colour"),
    (HEADER + "aws,x,us-east-1,A10G,one,22,4,16,1.0\n", "line 2: gpu_count 'one' is not a whole number"),
    (HEADER + "aws,x,us-east-1,A10G,1,22,4,16\n", "line 2: expected 9 fields, found 8"),
    (HEADER + "# c\naws,x,us-east-1,,1,22,4,16,1.0\n", "line 3: gpu is empty but gpu_count is 1"),
    (HEADER + "aws,x,us-east-1,A10G,1,22,4,16,-1\n", "line 2: price_per_hour must be at least 0"),
    (HEADER + "aws,,us-east-1,A10G,1,22,4,16,1\n", "line 2: instance_type is empty"),
    (HEADER.strip() + ",compute_capability\naws,x,us-east-1,A10G,1,22,4,16,1,eight\n",
     "line 2: compute_capability 'eight' is not a number"),
    (HEADER.strip() + ",compute_capability\naws,x,us-east-1,A10G,1,22,4,16,1,86\n",
     "line 2: compute_capability '86' is not a CUDA compute capability such as 7.5 or 8.9"),
    (HEADER.strip() + ",compute_capability\nlocal,cpu,,,0,0,2,8,0,8.0\n",
     "line 2: compute_capability '8.0' is set on a CPU-only row"),
    ("", "the catalog is empty"),
])
def test_user_catalog_errors_name_line_and_column(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_catalog_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_catalog(tmp_path / "nope.csv")


def test_builtin_offers_filter_and_move_to_requested_regions(cache):
    offers = builtin_aws_offers(OfferRequest(gpu="L40S", max_price_per_hour=5))
    assert {o.instance_type for o in offers} == {"g6e.2xlarge", "g6e.4xlarge"}
    moved = builtin_aws_offers(OfferRequest(regions=("eu-west-1", "us-east-1"), gpu="T4"))
    assert {o.region for o in moved} == {"eu-west-1", "us-east-1"}
    assert all("us-west-2 price" in o.price_source for o in moved)


def test_refreshed_cache_wins_over_builtin(cache):
    assert load_cached_offers("aws") is None
    live = Offer("aws", "g6.xlarge", "us-east-1", "L4", 1, 22.06, 4, 16, 0.70)
    path = save_cached_offers("aws", [live], "AWS Price List API")
    assert path.parent == cache / "catalog"
    offers = builtin_aws_offers(OfferRequest())
    assert len(offers) == 1 and offers[0].price_per_hour == 0.70
    assert offers[0].price_source.startswith("AWS Price List API")
    path.write_text("{broken")
    assert load_cached_offers("aws") is None  # damaged cache: fall back to built-in
    assert len(builtin_aws_offers(OfferRequest())) == 19


def test_cache_written_before_compute_capability_still_loads(cache):
    path = save_cached_offers("aws", [Offer("aws", "g4dn.xlarge", "us-east-1", "T4", 1, 14.8,
                                            4, 16, 0.5)], "AWS Price List API")
    doc = json.loads(path.read_text())
    for raw in doc["offers"]:
        del raw["compute_capability"]
    path.write_text(json.dumps(doc))
    [offer] = load_cached_offers("aws")
    assert offer.compute_capability is None and offer_capability(offer) == 7.5


# ----------------------------------------------------------------------------- nvidia-smi

L4_SMI = "NVIDIA L4, 23034, 8.9\nNVIDIA L4, 23034, 8.9\n"


def fake_nvidia_smi(tmp_path: Path, monkeypatch, output: str, *, old_driver: bool = False) -> Path:
    """An nvidia-smi on PATH that answers the GPU query as a real one does. An old driver
    refuses the compute_cap field (exit 2, as nvidia-smi does for unknown fields)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    refuse = ('case "$1" in *compute_cap*) echo "Field \\"compute_cap\\" is not a valid field '
              'to query." >&2; exit 2;; esac\n') if old_driver else ""
    body = output if not old_driver else "\n".join(
        ",".join(line.split(",")[:2]) for line in output.strip().splitlines()) + "\n"
    fake.write_text(f'#!/bin/sh\necho "$1" >> {calls}\n{refuse}'
                    f'[ "$2" = "--format=csv,noheader,nounits" ] || exit 9\n'
                    f"printf '%s' '{body}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    return calls


def test_nvidia_smi_reports_compute_capability():
    [offer] = nvidia_offers("local", "local-gpu", L4_SMI, vcpus=16, memory_gib=64.0)
    assert (offer.gpu, offer.gpu_count, offer.compute_capability) == ("NVIDIA L4", 2, 8.9)
    assert offer.gpu_memory_gib == pytest.approx(22.49, abs=0.01)
    # Mixed models: the first model's GPUs only; unreadable fields are skipped or None.
    text = "NVIDIA L4, 23034, 8.9\nTesla T4, 15360, 7.5\nNVIDIA L4, [N/A], 8.9\nNVIDIA L4, 23034, [N/A]\n"
    [offer] = nvidia_offers("ssh", "ssh:h", text, vcpus=8, memory_gib=32.0)
    assert (offer.gpu_count, offer.compute_capability) == (2, 8.9)
    assert parse_nvidia_smi("Tesla T4, 15360\n") == [("Tesla T4", 15.0, None)]
    assert parse_nvidia_smi("No devices were found\n") == []


def test_local_offers_ask_nvidia_smi_for_compute_capability(tmp_path, monkeypatch):
    calls = fake_nvidia_smi(tmp_path, monkeypatch, L4_SMI)
    [offer] = LocalProvider(root=tmp_path / "runs").offers(OfferRequest())
    assert (offer.gpu, offer.gpu_count, offer.compute_capability) == ("NVIDIA L4", 2, 8.9)
    assert calls.read_text().split() == [f"--query-gpu={NVIDIA_SMI_FIELDS}"]


def test_drivers_without_compute_cap_are_asked_again_without_it(tmp_path, monkeypatch):
    calls = fake_nvidia_smi(tmp_path, monkeypatch, L4_SMI, old_driver=True)
    [offer] = LocalProvider(root=tmp_path / "runs").offers(OfferRequest())
    assert (offer.gpu_count, offer.compute_capability, offer_capability(offer)) == (2, None, 8.9)
    assert calls.read_text().split() == ["--query-gpu=name,memory.total,compute_cap",
                                         "--query-gpu=name,memory.total"]


def test_docker_gpus_carry_compute_capability(tmp_path, monkeypatch):
    from ephemera_providers.docker import nvidia_gpus

    fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H100 80GB HBM3, 81559, 9.0\n")
    assert nvidia_gpus() == [("NVIDIA H100 80GB HBM3", pytest.approx(79.647, abs=0.001), 9.0)]
