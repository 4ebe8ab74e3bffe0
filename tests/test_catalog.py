"""Catalogs: the built-in AWS file, users' CSV files (line-numbered errors), the cache."""

from __future__ import annotations

import pytest

from ephemera.catalog import (
    BUILTIN_AWS_SOURCE,
    builtin_aws_catalog,
    builtin_aws_offers,
    load_cached_offers,
    load_catalog,
    save_cached_offers,
)
from ephemera.errors import ConfigError
from ephemera.provider import Offer, OfferRequest

HEADER = "provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from ephemera.settings import reset_settings

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
    # Unmeasured types sit below nominal.
    assert offers["g4dn.xlarge"].gpu_memory_gib < 16


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


@pytest.mark.parametrize(("body", "message"), [
    ("provider,instance_type\n", "line 1: missing column(s) region"),
    (HEADER.strip() + ",colour\n", "unknown column(s) colour"),
    (HEADER + "aws,x,us-east-1,A10G,one,22,4,16,1.0\n", "line 2: gpu_count 'one' is not a whole number"),
    (HEADER + "aws,x,us-east-1,A10G,1,22,4,16\n", "line 2: expected 9 fields, found 8"),
    (HEADER + "# c\naws,x,us-east-1,,1,22,4,16,1.0\n", "line 3: gpu is empty but gpu_count is 1"),
    (HEADER + "aws,x,us-east-1,A10G,1,22,4,16,-1\n", "line 2: price_per_hour must be at least 0"),
    (HEADER + "aws,,us-east-1,A10G,1,22,4,16,1\n", "line 2: instance_type is empty"),
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
