"""The built-in CPU image: built (or found) once, a second build is a no-op, and a
real vLLM server in it, launched through the docker provider, serves the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ephemera.builtins import cpu_image as cpu_image_mod
from ephemera.provider import InstanceState, LaunchSpec, Offer, make_labels
from tests.fixtures.common import free_port

pytestmark = pytest.mark.docker


@pytest.mark.timeout(1800)
def test_image_exists_and_second_build_is_a_fast_no_op(cpu_image, docker_engine):
    assert cpu_image == f"ephemera/cpu:{cpu_image_mod.image_tag()}"
    image = docker_engine.images.get(cpu_image)
    assert "ephemera/cpu:latest" in image.tags
    assert image.labels["dev.ephemera.enforce-eager"] == "true"
    started = time.monotonic()
    lines: list[str] = []
    assert cpu_image_mod.ensure_cpu_image(lines.append) == cpu_image
    assert time.monotonic() - started < 2.0
    assert lines == [f"{cpu_image} already built"]
    # The job's image name resolves to the current recipe's tag.
    assert cpu_image_mod.resolve_image("ephemera/cpu") == cpu_image
    assert cpu_image_mod.resolve_image("vllm/vllm-openai:v0.9.0") == "vllm/vllm-openai:v0.9.0"


@pytest.mark.timeout(120)
def test_image_status_command_reports_json(cpu_image):
    done = subprocess.run([sys.executable, "-m", "ephemera", "image", "status", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["image"] == cpu_image and info["present"] is True
    assert info["size_bytes"] > 1_000_000_000 and info["base_present"] is True


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_vllm_in_the_image_serves_the_tiny_model(cpu_image, tiny_model, docker_engine, tmp_path):
    from ephemera_providers.docker import DockerProvider

    provider = DockerProvider(docker_engine)
    run_id = f"v{uuid.uuid4().hex[:10]}"
    expires = datetime.now(UTC) + timedelta(minutes=8)
    offer = Offer("docker", "docker-cpu", None, None, 0, 0.0, 2, 4.0, 0.0)
    spec = LaunchSpec(run_id=run_id, job_name="cpu-image", offer=offer, image="ephemera/cpu",
                      labels=make_labels(run_id, "cpu-image", "tests", expires),
                      expires_at=expires, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                      options={"docker": {"network": "host", "shm_size": "1g"}})
    instance = provider.launch(spec)
    try:
        deadline = time.monotonic() + 60
        while (instance := provider.poll(instance)).state != InstanceState.READY:
            assert time.monotonic() < deadline and instance.state != InstanceState.FAILED
            time.sleep(0.3)
        remote = provider.connect(instance)
        model_dir = f"{instance.workdir}/model"
        remote.put(tiny_model, model_dir, timeout=120)
        port = free_port()
        started = time.monotonic()
        handle = remote.start(
            "python -m vllm.entrypoints.openai.api_server"
            f" --model {model_dir} --served-model-name ephemera/tiny-llama"
            f" --host 127.0.0.1 --port {port} --max-model-len 256 --dtype bfloat16"
            " --enforce-eager",
            cwd=instance.workdir, log_file=f"{instance.workdir}/server.log")
        local = remote.forward(port)
        health_deadline = time.monotonic() + 420
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/health", timeout=3) as rsp:
                    if rsp.status == 200:
                        break
            except OSError:
                pass
            if not remote.is_running(handle) or time.monotonic() > health_deadline:
                log = remote.run(f"tail -40 {instance.workdir}/server.log").output_tail
                pytest.fail(f"vLLM did not become healthy:\n{log}")
            time.sleep(1)
        print(f"vLLM /health answered {time.monotonic() - started:.0f}s after start")
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/v1/models", timeout=10) as rsp:
            models = json.loads(rsp.read())
        assert [m["id"] for m in models["data"]] == ["ephemera/tiny-llama"]
        body = json.dumps({"model": "ephemera/tiny-llama", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "Hello!"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{local}/v1/chat/completions",
                                         data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as rsp:
            answer = json.loads(rsp.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert 0 < answer["usage"]["completion_tokens"] <= 8
        remote.stop(handle, grace=5)
        assert not remote.is_running(handle)
    finally:
        provider.terminate(instance)
