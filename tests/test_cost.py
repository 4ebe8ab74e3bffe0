"""Cost arithmetic on a fixed clock: per-second billing, the provider minimum, the split
by phase, and the report files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ephemera.errors import ConfigError
from ephemera.results.cost import (
    GAP_ROW,
    PADDING_ROW,
    CIContext,
    CostReport,
    PhaseTiming,
    compute_cost,
    min_billed_seconds_for,
    write_cost_files,
)

T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
PRICE = 1.006  # g5.xlarge on-demand, us-east-1 (reference catalog)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def phases(*spec: tuple[str, float, float]) -> list[PhaseTiming]:
    return [PhaseTiming(name, at(a), at(b)) for name, a, b in spec]


def cost(**overrides):
    args = dict(
        run_id="r-1", job="qwen3-4b", tier="smoke", model="Qwen/Qwen3-4B", provider="aws",
        instance_type="g5.xlarge", region="us-east-1", spot=False, price_per_hour=PRICE,
        price_source="built-in catalog 2026-11-01", launched_at=at(10), terminated_at=at(10),
        phases=[], min_billed_seconds=None, estimated_cost_usd=None, estimated_seconds=None,
        ci=CIContext(),
    )
    args.update(overrides)
    return compute_cost(**args)


FULL_RUN = phases(
    ("plan", 0, 10),            # before launch: free
    ("provision", 10, 40),
    ("boot", 40, 130),
    ("server_start", 130, 430),  # model loading: 300 s
    ("suite", 430, 1030),        # tests: 600 s
    ("collect", 1030, 1050),
    ("teardown", 1050, 1080.4),
)


def test_per_second_billing_and_phase_split_add_up():
    report = cost(launched_at=at(10), terminated_at=at(1080.4), phases=FULL_RUN,
                  estimated_cost_usd=0.25, estimated_seconds=900)
    rate = PRICE / 3600
    assert report.runtime_seconds == pytest.approx(1070.4)
    assert report.billed_seconds == 1071            # rounded up to the second
    assert report.cost_usd == pytest.approx(1071 * rate)
    by_name = {p.name: p for p in report.phases}
    assert by_name["plan"].cost_usd == 0 and by_name["plan"].seconds == 10
    assert by_name["server_start"].billed_seconds == pytest.approx(300)
    assert by_name["server_start"].cost_usd == pytest.approx(300 * rate)
    assert by_name["suite"].cost_usd == pytest.approx(600 * rate)
    assert by_name["teardown"].billed_seconds == pytest.approx(30.4)
    assert report.unattributed_seconds == pytest.approx(0)
    assert report.padding_seconds == pytest.approx(0.6)   # the rounding up
    assert sum(r.cost_usd for r in report.rows()) == pytest.approx(report.cost_usd, abs=1e-12)
    assert report.cost_delta_usd == pytest.approx(1071 * rate - 0.25)
    assert report.duration_seconds == pytest.approx(1080.4)
    assert report.started_at == "2026-11-21T12:00:00.000Z"


def test_aws_minimum_of_sixty_seconds_is_billed_and_shown_as_padding():
    report = cost(launched_at=at(0), terminated_at=at(12),
                  phases=phases(("provision", 0, 5), ("teardown", 5, 12)))
    assert report.min_billed_seconds == 60
    assert report.billed_seconds == 60
    assert report.cost_usd == pytest.approx(60 * PRICE / 3600)
    assert report.padding_seconds == pytest.approx(48)
    padding = [r for r in report.rows() if r.name == PADDING_ROW]
    assert padding and padding[0].cost_usd == pytest.approx(48 * PRICE / 3600)
    assert sum(r.cost_usd for r in report.rows()) == pytest.approx(report.cost_usd)


def test_no_minimum_for_other_providers_and_override():
    assert min_billed_seconds_for("aws") == 60
    assert min_billed_seconds_for("docker") == 0

    class Provider:
        min_billed_seconds = 300

    assert min_billed_seconds_for("aws", Provider()) == 300
    report = cost(provider="docker", price_per_hour=0.0, launched_at=at(0), terminated_at=at(12))
    assert report.billed_seconds == 12 and report.cost_usd == 0
    report = cost(provider="ssh", price_per_hour=3.6, launched_at=at(0), terminated_at=at(12),
                  min_billed_seconds=120)
    assert report.billed_seconds == 120 and report.cost_usd == pytest.approx(0.12)


def test_gaps_between_phases_are_attributed_explicitly():
    report = cost(price_per_hour=3.6, launched_at=at(0), terminated_at=at(200),
                  phases=phases(("provision", 0, 50), ("suite", 80, 150), ("teardown", 170, 200)))
    assert report.unattributed_seconds == pytest.approx(50)
    gap = next(r for r in report.rows() if r.name == GAP_ROW)
    assert gap.cost_usd == pytest.approx(0.05)
    assert report.cost_usd == pytest.approx(0.2)
    assert sum(r.cost_usd for r in report.rows()) == pytest.approx(0.2)


def test_overlapping_phases_are_not_billed_twice():
    report = cost(price_per_hour=3.6, launched_at=at(0), terminated_at=at(100),
                  phases=phases(("boot", 0, 60), ("server_start", 40, 100)))
    by_name = {p.name: p for p in report.phases}
    assert by_name["boot"].billed_seconds == pytest.approx(60)
    assert by_name["server_start"].billed_seconds == pytest.approx(40)
    assert by_name["server_start"].seconds == pytest.approx(60)   # wall time kept as is
    assert sum(r.cost_usd for r in report.rows()) == pytest.approx(report.cost_usd)


def test_phase_running_past_termination_is_clipped():
    report = cost(price_per_hour=3.6, launched_at=at(0), terminated_at=at(100),
                  phases=phases(("suite", 0, 90), ("report", 90, 130)))
    assert {p.name: p.billed_seconds for p in report.phases} == {"suite": 90, "report": 10}


def test_nothing_launched_costs_nothing():
    report = cost(launched_at=None, terminated_at=None, phases=phases(("plan", 0, 3)))
    assert report.billed_seconds == 0 and report.cost_usd == 0 and report.padding_seconds == 0
    assert report.duration_seconds == pytest.approx(3)


def test_unverified_termination_bills_to_last_phase_and_says_so(tmp_path):
    report = cost(price_per_hour=3.6, launched_at=at(0), terminated_at=None,
                  phases=phases(("suite", 0, 100), ("teardown", 100, 130)))
    assert not report.termination_verified
    assert report.billed_seconds == 130
    _, md = write_cost_files(report, tmp_path)
    assert "not verified" in md.read_text()


def test_spot_and_spot_market_in_markdown(tmp_path):
    report = cost(spot=True, price_per_hour=0.4, price_source="live", launched_at=at(0),
                  terminated_at=at(3600), phases=phases(("suite", 0, 3600)))
    assert report.cost_usd == pytest.approx(0.4)
    _, md = write_cost_files(report, tmp_path)
    text = md.read_text()
    assert "spot" in text and "live" in text and "$0.4000" in text


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="naive"):
        cost(launched_at=datetime(2026, 1, 1), terminated_at=datetime(2026, 1, 1, 0, 5))


def test_negative_price_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="price_per_hour"):
        cost(price_per_hour=-1)


def test_files_round_trip_and_agree(tmp_path):
    ci = CIContext(commit="abc123", run_id="987-2", repository="acme/llm", server_url="https://github.com")
    report = cost(launched_at=at(10), terminated_at=at(1080.4), phases=FULL_RUN,
                  estimated_cost_usd=0.25, estimated_seconds=900, ci=ci).with_outcome("passed", 0)
    json_path, md_path = write_cost_files(report, tmp_path / "run")
    assert json_path.name == "cost.json" and md_path.name == "cost.md"
    raw = json.loads(json_path.read_text())
    assert raw["cost_usd"] == report.cost_usd and raw["billed_seconds"] == 1071
    assert raw["ci"]["commit"] == "abc123" and raw["status"] == "passed"
    again = CostReport.from_json(json_path)
    assert again == report
    md = md_path.read_text()
    for needle in ("g5.xlarge", "us-east-1", "on-demand", "built-in catalog 2026-11-01",
                   "server_start", "suite", "teardown", "estimate $0.2500", "minimum 60s",
                   f"${report.cost_usd:.4f}", "passed"):
        assert needle in md, needle
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_ci_context_from_github_environment():
    env = {"GITHUB_SHA": "deadbeef", "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "3",
           "GITHUB_REPOSITORY": "acme/llm", "GITHUB_SERVER_URL": "https://github.com"}
    assert CIContext.from_env(env) == CIContext("deadbeef", "42-3", "acme/llm", "https://github.com")
    assert CIContext.from_env({}) == CIContext()


@pytest.mark.parametrize("content, field", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"job": "x"}', "'run_id' is missing"),
    ('{"run_id": "a", "job": "x", "provider": "aws", "instance_type": "t", "price_per_hour": -1,'
     ' "billed_seconds": 1, "cost_usd": 1}', "'price_per_hour'"),
    ('{"schema_version": 99, "run_id": "a"}', "schema_version 99"),
])
def test_bad_cost_json_names_the_problem(tmp_path, content, field):
    path = tmp_path / "cost.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=field) as info:
        CostReport.from_json(path)
    assert str(path) in str(info.value)


# ---- what really ran: the launched machine's market, region and price ------------------

def _offer(**changes):
    from ephemera.provider import Offer

    values = dict(provider="aws", instance_type="g5.xlarge", region="us-east-1", gpu="A10G",
                  gpu_count=1, gpu_memory_gib=22.06, vcpus=4, memory_gib=16, price_per_hour=0.35,
                  spot=True, price_source="AWS spot price history 2026-11-20")
    values.update(changes)
    return Offer(**values)


def _instance(data):
    from ephemera.provider import Instance, InstanceState

    return Instance(provider="aws", id="i-0abc", run_id="r-1", state=InstanceState.READY,
                    instance_type="g5.xlarge", region=data.get("region"), data=data)


def test_billed_terms_prefer_what_was_launched():
    from ephemera.results.cost import billed_terms

    offer = _offer()
    assert billed_terms(offer, None) == {
        "instance_type": "g5.xlarge", "region": "us-east-1", "spot": True,
        "price_per_hour": 0.35, "price_source": "AWS spot price history 2026-11-20"}
    # Spot had no capacity: on-demand in another region, at that region's price.
    fallback = _instance({"market": "on-demand", "region": "us-west-2",
                          "price_per_hour": "1.006", "price_source": "built-in catalog"})
    assert billed_terms(offer, fallback) == {
        "instance_type": "g5.xlarge", "region": "us-west-2", "spot": False,
        "price_per_hour": 1.006, "price_source": "built-in catalog"}
    # A provider that records no price: the plan's price, saying what differs.
    unpriced = billed_terms(offer, _instance({"market": "on-demand", "region": "us-east-1"}))
    assert unpriced["spot"] is False and unpriced["price_per_hour"] == 0.35
    assert "the plan's price" in unpriced["price_source"]
    # Providers that record nothing of the kind (local, docker) keep the offer's terms.
    assert billed_terms(offer, _instance({"pid": "123"})) == billed_terms(offer, None)
    bad = billed_terms(offer, _instance({"market": "spot", "price_per_hour": "n/a"}))
    assert bad["price_per_hour"] == 0.35


def test_cost_report_bills_the_launched_machine(tmp_path):
    """The run's report stage prices the instance that ran, not the planned offer."""
    from types import SimpleNamespace

    from ephemera_providers.aws import AWSProvider

    from ephemera.lifecycle.records import RunResult
    from ephemera.results.reporting import write_reports

    warnings = []
    instance = _instance({"market": "on-demand", "region": "us-west-2", "price_per_hour": "3.6",
                          "price_source": "AWS Price List API 2026-11-20"})
    run = SimpleNamespace(
        run_id="r-1", job=SimpleNamespace(name="qwen3-4b", timeout=900,
                                          model=SimpleNamespace(id="Qwen/Qwen3-4B")),
        loaded=SimpleNamespace(tier="smoke"), provider_name="aws", provider=None,
        caps=AWSProvider.capabilities({}), offer=_offer(), plan=SimpleNamespace(offer=_offer(), expected_cost_usd=0.05),
        instance=instance, launched_at=at(0), terminated_at=at(100), teardown_result=None,
        phases=[SimpleNamespace(name="suite", started_at=at(0), ended_at=at(100))],
        reporter=SimpleNamespace(warn=warnings.append),
        settings=SimpleNamespace(history_path=tmp_path / "history.sqlite3"),
        artifacts_dir=tmp_path / "run")
    result = RunResult(run_id="r-1", status="passed", exit_code=0, job="qwen3-4b", tier="smoke",
                       provider="aws", teardown_verified=True)
    out = write_reports(run, result)
    assert out is not None, warnings
    raw = json.loads((tmp_path / "run" / "cost.json").read_text())
    assert raw["spot"] is False and raw["region"] == "us-west-2"
    assert raw["price_per_hour"] == 3.6 and raw["price_source"] == "AWS Price List API 2026-11-20"
    assert raw["cost_usd"] == pytest.approx(0.1)  # 100 s at 3.6/h
    assert "on-demand" in (tmp_path / "run" / "cost.md").read_text()
