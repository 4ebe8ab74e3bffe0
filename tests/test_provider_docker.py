"""The docker provider against a real Docker engine: launch, exec, copies both ways,
forwarding, termination, and the dead-man switch surviving a killed ephemera."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ephemera.errors import ConfigError
from ephemera.provider import InstanceState, OfferRequest
from tests.fixtures.common import free_port

pytestmark = pytest.mark.docker


def _run_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _ready(provider, instance, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while True:
        instance = provider.poll(instance)
        if instance.state == InstanceState.READY:
            return instance
        assert instance.state in (InstanceState.PENDING, InstanceState.RUNNING), instance
        assert time.monotonic() < deadline, "container did not become ready"
        time.sleep(0.2)


@pytest.fixture
def launched(contract_docker):
    provider = contract_docker.provider
    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "env": {"GREETING": "hello", "SECRET_TOKEN": "s3cr3t"}})
    instance = provider.launch(spec)
    try:
        yield provider, spec, _ready(provider, instance)
    finally:
        provider.terminate(instance)


@pytest.mark.timeout(120)
def test_offers_cpu_only_without_gpus(contract_docker):
    offers = contract_docker.provider.offers(OfferRequest())
    assert len(offers) == 1
    offer = offers[0]
    assert offer.cpu_only and offer.price_per_hour == 0.0
    assert offer.vcpus >= 1 and offer.memory_gib > 1


@pytest.mark.timeout(120)
def test_launch_labels_workdir_and_idempotence(launched, docker_engine):
    provider, spec, instance = launched
    container = docker_engine.containers.get(instance.id)
    assert container.name == f"ephemera-{spec.run_id}"
    assert container.labels["dev.ephemera.run-id"] == spec.run_id
    assert container.labels["dev.ephemera.job"] == "contract"
    assert container.labels["dev.ephemera.owner"] == "tests"
    assert container.labels["dev.ephemera.expires-at"] == spec.labels["expires-at"]
    assert container.attrs["HostConfig"]["AutoRemove"] is True
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert container.attrs["HostConfig"]["ShmSize"] == 2**30
    assert instance.workdir == f"/ephemera/{spec.run_id}"
    assert json.loads(instance.data["ports"]) == {}
    # A second launch of the same run returns the same container.
    again = provider.launch(spec)
    assert again.id == instance.id
    found = provider.find({"run-id": spec.run_id})
    assert [f.id for f in found] == [instance.id]
    assert found[0].labels["job"] == "contract"


@pytest.mark.timeout(120)
def test_exec_streams_lines_exit_status_env_and_cwd(launched, tmp_path):
    provider, _spec, instance = launched
    remote = provider.connect(instance)
    lines: list[str] = []
    log = tmp_path / "cmd.log"
    result = remote.run('echo "$GREETING"; pwd; echo oops >&2; echo "$RUNTIME_VAR"; exit 3',
                        env={"RUNTIME_VAR": "value-from-env"}, cwd=instance.workdir,
                        on_line=lines.append, log_path=log)
    assert result.exit_status == 3 and not result.timed_out
    # Values of env given to run() are masked wherever output is written.
    assert lines == ["hello", instance.workdir, "oops", "***"]
    assert log.read_text().splitlines() == lines
    assert "value-from-env" not in result.output_tail
    # A missing working directory is a failure, not a silent run elsewhere.
    assert remote.run("true", cwd="/does/not/exist").exit_status == 125


@pytest.mark.timeout(120)
def test_timeout_kills_the_whole_process_group(launched):
    provider, _spec, instance = launched
    remote = provider.connect(instance)
    started = time.monotonic()
    result = remote.run("sleep 300 & sleep 301; echo never", timeout=2)
    assert result.timed_out and result.exit_status is None
    assert time.monotonic() - started < 15
    time.sleep(0.5)
    left = remote.run("ps -eo args | grep -c '^sleep 30[01]' || true", timeout=20)
    assert left.output_tail.strip().splitlines()[-1] == "0"


@pytest.mark.timeout(120)
def test_detached_start_is_running_and_stop(launched):
    provider, _spec, instance = launched
    remote = provider.connect(instance)
    handle = remote.start("sleep 600", log_file=f"{instance.workdir}/bg.log")
    assert remote.is_running(handle)
    remote.stop(handle, grace=2)
    assert not remote.is_running(handle)


@pytest.mark.timeout(120)
def test_copy_both_ways_files_dirs_and_globs(launched, tmp_path):
    provider, _spec, instance = launched
    remote = provider.connect(instance)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    single = tmp_path / "single.json"
    single.write_text('{"x": 1}')
    work = instance.workdir
    remote.put(src, f"{work}/tree")
    remote.put(single, f"{work}/deep/er/one.json")
    listing = remote.run(f"cd {work} && find . -type f | sort && cat deep/er/one.json")
    assert listing.output_tail.splitlines() == [
        "./deep/er/one.json", "./tree/a.txt", "./tree/sub/b.bin", '{"x": 1}']
    remote.run(f"cd {work} && echo r1 > result-1.txt && echo r2 > result-2.txt")

    back = tmp_path / "back"
    got_dir = remote.get(f"{work}/tree", back)
    assert sorted(p.relative_to(back).as_posix() for p in got_dir) == ["tree/a.txt", "tree/sub/b.bin"]
    assert (back / "tree" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    got_glob = remote.get(f"{work}/result-*.txt", back)
    assert sorted(p.name for p in got_glob) == ["result-1.txt", "result-2.txt"]
    assert (back / "result-2.txt").read_text() == "r2\n"
    assert remote.get(f"{work}/missing.txt", back) == []
    assert remote.get(f"{work}/nothing-*.txt", back) == []

    # Several paths with one check: a link, a path outside, a missing one and globs.
    remote.run(f"cd {work} && ln -s /etc/hostname link.txt && mkdir -p out && ln -s /etc out/etc")
    refused: list[str] = []
    many = remote.get_many([f"{work}/tree/a.txt", f"{work}/link.txt", f"{work}/out/etc/hostname",
                            f"{work}/missing.txt", f"{work}/result-*.txt", "/etc/hostname"],
                           tmp_path / "many", within=work, refused=refused)
    assert [sorted(p.name for p in files) for files in many] == [
        ["a.txt"], [], [], [], ["result-1.txt", "result-2.txt"], []]
    assert len(refused) == 3 and "link.txt is a symbolic link" in refused[0]
    assert all("outside the run directory" in why for why in refused[1:])


@pytest.mark.timeout(120)
def test_forward_on_host_network_reaches_a_server_in_the_container(launched):
    import urllib.request

    provider, _spec, instance = launched
    remote = provider.connect(instance)
    port = free_port()
    handle = remote.start(f"python3 -m http.server {port} --bind 127.0.0.1",
                          cwd=instance.workdir, log_file=f"{instance.workdir}/http.log")
    remote.run(f"echo served > {instance.workdir}/hello.txt")
    local = remote.forward(port)
    assert local == port
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=2) as rsp:
                assert rsp.read() == b"served\n"
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    remote.stop(handle, grace=2)


@pytest.mark.timeout(120)
def test_bridge_network_publishes_ports_on_loopback_only(contract_docker, docker_engine):
    provider = contract_docker.provider
    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "ports": (8000,), "options": {"docker": {"network": "bridge"}}})
    instance = provider.launch(spec)
    try:
        instance = _ready(provider, instance)
        bindings = docker_engine.containers.get(instance.id).attrs["NetworkSettings"]["Ports"]["8000/tcp"]
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
        host_port = int(bindings[0]["HostPort"])
        assert json.loads(instance.data["ports"]) == {"8000": host_port}
        assert provider.connect(instance).forward(8000) == host_port
        with pytest.raises(ConfigError, match="not published"):
            provider.connect(instance).forward(9000)
    finally:
        provider.terminate(instance)


@pytest.mark.timeout(120)
def test_terminate_removes_and_is_idempotent(contract_docker, docker_engine):
    import docker

    provider = contract_docker.provider
    instance = _ready(provider, provider.launch(contract_docker.make_spec(_run_id())))
    provider.terminate(instance)
    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(instance.id)
    provider.terminate(instance)  # already gone: success
    assert provider.poll(instance).state == InstanceState.TERMINATED
    assert provider.find({"run-id": instance.run_id}) == []


@pytest.mark.timeout(60)
def test_missing_image_is_a_config_error_naming_it(contract_docker):
    provider = contract_docker.provider
    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "image": "ephemera-test/no-such-image:1"})
    with pytest.raises(ConfigError, match="ephemera-test/no-such-image:1"):
        provider.launch(spec)


@pytest.mark.timeout(60)
def test_bad_network_option_names_the_field(contract_docker):
    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "options": {"docker": {"network": "overlay"}}})
    with pytest.raises(ConfigError, match="resources.docker.network"):
        contract_docker.provider.launch(spec)


@pytest.mark.timeout(120)
def test_dead_man_switch_survives_a_killed_ephemera(contract_docker, docker_engine, tmp_path):
    """A child process launches with an 8 s expiry and is SIGKILLed; the container must
    remove itself at its expiry with nothing left to tear it down."""
    import docker

    run_id = _run_id()
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from datetime import UTC, datetime, timedelta
        from ephemera.provider import LaunchSpec, Offer, make_labels
        from ephemera_providers.docker import DockerProvider
        expires = datetime.now(UTC) + timedelta(seconds=8)
        offer = Offer("docker", "docker-cpu", None, None, 0, 0.0, 1, 1.0, 0.0)
        spec = LaunchSpec(run_id={run_id!r}, job_name="deadman", offer=offer,
                          image={contract_docker.image!r},
                          labels=make_labels({run_id!r}, "deadman", "tests", expires),
                          expires_at=expires, options={{"docker": {{"network": "host"}}}})
        inst = DockerProvider().launch(spec)
        print(inst.id, flush=True)
        time.sleep(600)
    """))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    container_id = child.stdout.readline().strip()
    launched_at = datetime.now(UTC)
    assert container_id, "the launcher did not start a container"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert docker_engine.containers.get(container_id).status == "running"
    deadline = time.monotonic() + 40
    while True:
        try:
            docker_engine.containers.get(container_id)
        except docker.errors.NotFound:
            break
        assert time.monotonic() < deadline, "container outlived its expiry"
        time.sleep(0.5)
    gone_after = datetime.now(UTC) - launched_at
    assert timedelta(seconds=5) < gone_after < timedelta(seconds=30)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("network", ["host", "bridge"])
def test_exec_over_ssh_option(contract_docker, tmp_path, network):
    """exec: ssh starts the image's sshd with the run's key; commands and copies then go
    over SSH (host key pinned from the container), on both network kinds."""
    from ephemera.transport.ssh import generate_keypair
    from ephemera.transport.ssh_remote import SSHRemote

    key_path, public = generate_keypair(tmp_path / "keys")
    provider = contract_docker.provider
    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "ssh_public_key": public,
                         "ssh_private_key_path": str(key_path), "env": {"GREETING": "hi there"},
                         "options": {"docker": {"network": network, "exec": "ssh"}}})
    instance = provider.launch(spec)
    try:
        instance = _ready(provider, instance)
        assert instance.data["exec"] == "ssh"
        assert instance.endpoint.host == "127.0.0.1" and instance.endpoint.key_path == str(key_path)
        assert instance.endpoint.host_key.startswith("ssh-ed25519 ")
        remote = provider.connect(instance)
        assert isinstance(remote, SSHRemote)
        try:
            result = remote.run("hostname; echo via-ssh", cwd=instance.workdir)
            assert result.ok and result.output_tail.splitlines()[-1] == "via-ssh"
            # The container's environment (launch env, image PATH) holds over SSH too.
            seen = remote.run('echo "$GREETING|$PATH"').output_tail.strip().splitlines()[-1]
            assert seen.startswith("hi there|") and "/usr/bin" in seen
            (tmp_path / "f.txt").write_text("over ssh\n")
            remote.put(tmp_path / "f.txt", f"{instance.workdir}/f.txt")
            got = remote.get(f"{instance.workdir}/f.txt", tmp_path / "back")
            assert [p.read_text() for p in got] == ["over ssh\n"]
        finally:
            remote.close()
    finally:
        provider.terminate(instance)


@pytest.mark.timeout(120)
def test_exec_over_ssh_makes_its_own_key_when_none_is_given(contract_docker, tmp_path):
    """A job with exec: ssh run by a controller that made no key still gets a working
    SSH channel: the provider makes a key for the run beside its state."""
    from ephemera.spec.settings import get_settings

    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "options": {"docker": {"exec": "ssh", "network": "host"}}})
    provider = contract_docker.provider
    instance = provider.launch(spec)
    try:
        instance = _ready(provider, instance)
        key_dir = get_settings().state_dir / "keys" / f"docker-{spec.run_id}"
        assert instance.endpoint.key_path == str(key_dir / "id_ed25519")
        remote = provider.connect(instance)
        try:
            assert remote.run("echo ok").output_tail.strip().endswith("ok")
        finally:
            remote.close()
    finally:
        provider.terminate(instance)
    assert not key_dir.exists(), "terminate must delete the run's key"


@pytest.mark.timeout(120)
def test_reap_command_removes_a_container_whose_label_has_expired(contract_docker, docker_engine):
    """The reaper works from labels alone: a container whose expires-at label is past
    (its own switch still running, e.g. after a clock change) is removed by
    `ephemera reap --provider docker`; a live one of another owner is kept."""
    import docker

    from ephemera.provider import format_time

    provider = contract_docker.provider
    stale = contract_docker.make_spec(_run_id())
    past = format_time(datetime.now(UTC) - timedelta(minutes=5))
    owner = f"reap-{uuid.uuid4().hex[:6]}"
    stale = type(stale)(**{**stale.__dict__,
                           "labels": {**stale.labels, "expires-at": past, "owner": owner}})
    live = contract_docker.make_spec(_run_id())
    live = type(live)(**{**live.__dict__, "labels": {**live.labels, "owner": owner}})
    stale_inst, live_inst = provider.launch(stale), provider.launch(live)
    try:
        done = subprocess.run([sys.executable, "-m", "ephemera", "reap", "--provider", "docker",
                               "--owner", owner, "--json"],
                              capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert [e["run_id"] for e in report["expired"]] == [stale.run_id]
        with pytest.raises(docker.errors.NotFound):
            docker_engine.containers.get(stale_inst.id)
        assert docker_engine.containers.get(live_inst.id).status == "running"
    finally:
        provider.terminate(stale_inst)
        provider.terminate(live_inst)


@pytest.mark.timeout(60)
def test_unbuilt_builtin_image_says_how_to_build_it(contract_docker, monkeypatch):
    """The built-in image is never pulled: a missing tag names it and the command."""
    from ephemera.builtins import cpu_image

    monkeypatch.setattr(cpu_image, "image_tag", lambda: "000000notbuilt")
    spec = contract_docker.make_spec(_run_id())
    spec = type(spec)(**{**spec.__dict__, "image": "ephemera/cpu"})
    with pytest.raises(ConfigError, match=r"ephemera/cpu:000000notbuilt.*ephemera image build-cpu"):
        contract_docker.provider.launch(spec)


@pytest.mark.timeout(60)
def test_gpu_offers_come_from_nvidia_smi(contract_docker, tmp_path, monkeypatch):
    """No GPU here: a stand-in nvidia-smi on PATH prints what the real one prints for
    two L4s, to check the query and its parsing (one offer per GPU count)."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=name,memory.total" ] || exit 9\n'
                    'printf "NVIDIA L4, 23034\\nNVIDIA L4, 23034\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    offers = contract_docker.provider.offers(OfferRequest())
    assert [(o.gpu, o.gpu_count) for o in offers] == [("NVIDIA L4", 1), ("NVIDIA L4", 2)]
    assert offers[0].gpu_memory_gib == 22.5 and offers[0].price_per_hour == 0.0
    assert contract_docker.provider.offers(OfferRequest(gpu="H100")) == []


@pytest.mark.timeout(120)
def test_job_container_cannot_gain_privileges(contract_docker):
    provider = contract_docker.provider
    instance = provider.launch(contract_docker.make_spec("docker-nonewprivs-1"))
    try:
        remote = provider.connect(instance)
        status = remote.run("grep NoNewPrivs /proc/self/status", timeout=30)
        assert status.ok and status.output_tail.split()[-1] == "1", status.output_tail
    finally:
        provider.terminate(instance)


@pytest.mark.parametrize("docker_host", [None, "ssh://ci@127.0.0.1"])
def test_the_sdk_loads_its_ssh_transport_only_for_an_ssh_engine(docker_engine, docker_host):
    """paramiko (and invoke through it) cost every docker run's start about 80 ms; only
    DOCKER_HOST=ssh://... needs them."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    if docker_host:
        env["DOCKER_HOST"] = docker_host
        code = ("from ephemera.transport.docker_engine import skip_ssh_transport; skip_ssh_transport(); "
                "import docker.transport; print(hasattr(docker.transport, 'SSHHTTPAdapter'))")
    else:
        code = ("import sys; from ephemera.transport.docker_engine import connect_docker; "
                "print(connect_docker('t').info()['ID'] != '' and 'paramiko' not in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
