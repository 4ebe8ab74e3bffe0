"""The slurm provider against a real one-node Slurm (tests/fixtures/slurm.py): the
provider contract, offers from sinfo, a request no node can satisfy, PENDING with
Slurm's reason, srun inside the allocation, and reap of expired jobs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ephemera.errors import ConfigError
from ephemera.provider import InstanceState, LaunchSpec, OfferRequest, make_labels
from tests.test_provider_contract import (  # noqa: F401 - collected here for slurm
    test_lifecycle_contract,
    test_terminate_of_an_unknown_instance_succeeds,
)


@pytest.fixture
def contract(contract_slurm):
    """The contract suite of tests/test_provider_contract.py, run for slurm."""
    return contract_slurm


@pytest.fixture
def provider(slurm_cluster, tmp_path, monkeypatch):
    from ephemera_providers.slurm import SlurmProvider

    from ephemera.spec.settings import reset_settings

    monkeypatch.setenv("EPHEMERA_SLURM_WORKROOT", str(tmp_path / "slurm-runs"))
    reset_settings()
    made = SlurmProvider()
    yield made
    for instance in made.find({"owner": "slurm-tests"}):
        made.terminate(instance)


def _spec(provider, gpus: int, *, expires_in: float = 600, labels_expire_in: float | None = None,
          owner: str = "slurm-tests") -> LaunchSpec:
    run_id = f"st-{uuid.uuid4().hex[:8]}"
    expires = datetime.now(UTC) + timedelta(seconds=expires_in)
    label_time = datetime.now(UTC) + timedelta(seconds=labels_expire_in or expires_in)
    offers = provider.offers(OfferRequest())
    offer = next(o for o in offers if o.gpu_count == min(gpus, 2))
    return LaunchSpec(run_id=run_id, job_name="slurm-test", offer=offer, image="host",
                      labels=make_labels(run_id, "slurm-test", owner, label_time),
                      expires_at=expires, gpu_count=gpus)


def _wait_state(provider, instance, state: InstanceState, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        instance = provider.poll(instance)
        if instance.state == state:
            return instance
        time.sleep(0.5)
    raise AssertionError(f"{instance.id} stayed {instance.state}: {instance.message}")


def _squeue(cluster) -> list[dict]:
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **cluster.env()}, check=True)
    return [j for j in json.loads(out.stdout)["jobs"]
            if j["job_state"] in ("PENDING", "RUNNING", "COMPLETING")]


# -------------------------------------------------------------------- offers (no cluster)

def test_sinfo_line_gives_one_offer_per_gpu_count_with_catalog_memory_and_price():
    from ephemera_providers.slurm import parse_sinfo_line

    offers = parse_sinfo_line("a100q|gpu:a100:4(S:0-1),gpu:l4:2|64|512000|up",
                              {"A100": 39.56, "L4": 22.06}, 1.5)
    by_type = {o.instance_type: o for o in offers}
    assert set(by_type) == {"a100q:cpu", "a100q:gpu:a100:1", "a100q:gpu:a100:2",
                            "a100q:gpu:a100:3", "a100q:gpu:a100:4", "a100q:gpu:l4:1", "a100q:gpu:l4:2"}
    two = by_type["a100q:gpu:a100:2"]
    assert (two.gpu, two.gpu_count, two.gpu_memory_gib, two.vcpus) == ("a100", 2, 39.56, 32)
    assert two.memory_gib == 250.0 and two.price_per_hour == 3.0 and two.region == "a100q"
    assert by_type["a100q:cpu"].gpu_count == 0 and by_type["a100q:cpu"].price_per_hour == 0.0


def test_sinfo_lines_of_partitions_down_or_unknown_gpus_give_no_gpu_offers():
    from ephemera_providers.slurm import parse_sinfo_line

    assert parse_sinfo_line("p|gpu:l4:2|8|1000|down", {"L4": 22.06}, 0) == []
    assert parse_sinfo_line("garbage", {}, 0) == []
    only_cpu = parse_sinfo_line("p|gpu:mystery:2|8|1000|up", {"L4": 22.06}, 0)
    assert [o.instance_type for o in only_cpu] == ["p:cpu"]


def test_a_partition_option_that_is_not_a_slurm_name_is_refused():
    from ephemera_providers.slurm import _option

    with pytest.raises(ConfigError, match="resources.options.partition"):
        _option({"options": {"partition": "gpu; rm -rf /"}}, "partition")


# -------------------------------------------------------------------- against the cluster

@pytest.mark.timeout(120)
def test_offers_come_from_sinfo_with_the_catalog_memory_of_the_gpu_type(provider, slurm_cluster):
    offers = {o.instance_type: o for o in provider.offers(OfferRequest())}
    p = slurm_cluster.partition
    assert set(offers) == {f"{p}:cpu", f"{p}:gpu:l4:1", f"{p}:gpu:l4:2"}
    assert offers[f"{p}:gpu:l4:2"].gpu_memory_gib == 22.06   # L4 in the built-in catalog
    assert offers[f"{p}:gpu:l4:2"].vcpus == slurm_cluster.cpus


@pytest.mark.timeout(120)
def test_three_gpus_are_refused_at_once_with_slurms_message(provider, slurm_cluster):
    spec = _spec(provider, 3)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="Requested node configuration is not available"):
        provider.launch(spec)
    assert time.monotonic() - started < 15
    assert provider.find({"run-id": spec.run_id}) == []
    assert not os.path.exists(provider._workdir(spec.run_id))


@pytest.mark.timeout(240)
def test_commands_run_inside_the_allocation_and_see_only_its_gpus(provider, tmp_path):
    first = provider.launch(_spec(provider, 2))
    first = _wait_state(provider, first, InstanceState.READY)
    waiting = provider.launch(_spec(provider, 1))
    try:
        # Both GPUs are taken: the second job waits, and says why.
        deadline = time.monotonic() + 30
        while "(" not in waiting.message and time.monotonic() < deadline:
            time.sleep(0.5)   # the reason is set at the scheduler's next pass
            waiting = provider.poll(waiting)
        assert waiting.state == InstanceState.PENDING
        assert "(Resources)" in waiting.message and waiting.data["queued"] == "yes"
        remote = provider.connect(first)
        out = remote.run('echo "gpus=$CUDA_VISIBLE_DEVICES job=$SLURM_JOB_ID"; pwd')
        assert out.ok, out.output_tail
        assert f"gpus=0,1 job={first.id}" in out.output_tail
        assert first.workdir in out.output_tail
        handle = remote.start("sleep 300", log_file="logs/sleep.log")
        assert remote.is_running(handle)
        (tmp_path / "f.txt").write_text("hello")
        remote.put(tmp_path / "f.txt", "in/f.txt")
        assert remote.run("cat in/f.txt").output_tail.strip() == "hello"
        got = remote.get("in/f.txt", tmp_path / "back")
        assert [p.read_text() for p in got] == ["hello"]
        provider.terminate(first)
        # The detached process is gone with the job, and the waiting job got the GPUs.
        assert not os.path.exists(first.workdir)
        assert subprocess.run(["pgrep", "-g", handle], capture_output=True).returncode == 1
        assert _wait_state(provider, waiting, InstanceState.READY).data["node"]
    finally:
        provider.terminate(first)
        provider.terminate(waiting)


@pytest.mark.timeout(300)
def test_reap_cancels_expired_jobs_and_nothing_else(provider, slurm_cluster):
    import getpass

    owner = os.environ.get("USER") or getpass.getuser()
    expired = provider.launch(_spec(provider, 1, labels_expire_in=-60, owner=owner))
    live = provider.launch(_spec(provider, 1, owner=owner))
    other = subprocess.run(["sbatch", "--parsable", "--job-name=not-ephemera", "--mem=100M",
                            "--time=5", "--output=/dev/null", "--wrap=sleep 300"], capture_output=True, text=True,
                           timeout=30, check=True).stdout.strip()
    try:
        env = {**os.environ, "EPHEMERA_OWNER": owner, "PYTHONPATH": os.getcwd()}
        out = subprocess.run([sys.executable, "-m", "ephemera", "reap", "--provider", "slurm",
                              "--json"], capture_output=True, text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert [(i["id"], i["verified"]) for i in report["expired"]] == [(expired.id, True)]
        ids = {str(j["job_id"]) for j in _squeue(slurm_cluster)}
        assert expired.id not in ids and {live.id, other} <= ids
    finally:
        subprocess.run(["scancel", other], timeout=30)
        provider.terminate(live)
        provider.terminate(expired)


@pytest.mark.timeout(180)
def test_slurms_tools_run_on_a_login_host_over_ssh(slurm_cluster, sshd, tmp_path, monkeypatch):
    """slurm_login_host: sinfo and sbatch run on the login node through the SSH layer
    (here the session's sshd in front of the test cluster), with the pinned host key."""
    from ephemera_providers.slurm import SlurmProvider

    from ephemera.spec.settings import reset_settings

    monkeypatch.setenv("EPHEMERA_SLURM_LOGIN_HOST", f"{sshd.user}@{sshd.host}:{sshd.port}")
    monkeypatch.setenv("EPHEMERA_SSH_KEY", sshd.key_path)
    monkeypatch.setenv("EPHEMERA_SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setenv("EPHEMERA_SLURM_WORKROOT", str(tmp_path / "slurm-runs"))
    monkeypatch.delenv("SLURM_CONF", raising=False)   # only the setting carries it
    reset_settings()
    provider = SlurmProvider()
    p = slurm_cluster.partition
    assert {o.instance_type for o in provider.offers(OfferRequest())} == {
        f"{p}:cpu", f"{p}:gpu:l4:1", f"{p}:gpu:l4:2"}
    with pytest.raises(ConfigError, match="Requested node configuration is not available"):
        provider.launch(_spec(provider, 3))
    assert provider.find({"owner": "slurm-tests"}) == []
