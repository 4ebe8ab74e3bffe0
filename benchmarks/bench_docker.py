"""Figures for the docker provider and the built-in CPU pieces: launch to ready,
exec round trip, copy throughput, terminate, and the cached no-op paths.

Run: .venv/bin/python benchmarks/bench_docker.py  (needs a running Docker engine
and the CPU base image, `ephemera image build-cpu` makes it).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ephemera_providers.docker import DockerProvider

from ephemera.builtins.cpu_image import BASE_REPO, base_tag
from ephemera.provider import InstanceState, LaunchSpec, Offer, make_labels


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main() -> None:
    provider = DockerProvider()
    run_id = f"bench{uuid.uuid4().hex[:8]}"
    expires = datetime.now(UTC) + timedelta(minutes=10)
    offer = Offer("docker", "docker-cpu", None, None, 0, 0.0, 1, 1.0, 0.0)
    spec = LaunchSpec(run_id=run_id, job_name="bench", offer=offer,
                      image=f"{BASE_REPO}:{base_tag()}",
                      labels=make_labels(run_id, "bench", "bench", expires), expires_at=expires,
                      options={"docker": {"network": "host"}})
    started = time.perf_counter()
    instance = provider.launch(spec)
    launch_s = time.perf_counter() - started
    while (instance := provider.poll(instance)).state != InstanceState.READY:
        time.sleep(0.05)
    ready_s = time.perf_counter() - started
    try:
        remote = provider.connect(instance)
        rtts = [timed(lambda: remote.run("true"))[0] for _ in range(20)]
        with tempfile.TemporaryDirectory() as tmp:
            blob = Path(tmp) / "blob.bin"
            blob.write_bytes(os.urandom(50 * 2**20))
            put_s, _ = timed(lambda: remote.put(blob, f"{instance.workdir}/blob.bin"))
            get_s, _ = timed(lambda: remote.get(f"{instance.workdir}/blob.bin", Path(tmp) / "back"))
    finally:
        term_s, _ = timed(lambda: provider.terminate(instance))
    print(f"launch call:             {launch_s * 1000:7.0f} ms")
    print(f"launch to READY:         {ready_s * 1000:7.0f} ms")
    print(f"exec round trip:         {statistics.median(rtts) * 1000:7.1f} ms median, "
          f"{max(rtts) * 1000:.1f} ms max (20 runs)")
    print(f"put 50 MiB:              {put_s * 1000:7.0f} ms ({50 / put_s:.0f} MiB/s)")
    print(f"get 50 MiB:              {get_s * 1000:7.0f} ms ({50 / get_s:.0f} MiB/s)")
    print(f"terminate (verified):    {term_s * 1000:7.0f} ms")

    from ephemera.builtins.cpu_env import ensure_cpu_env
    from ephemera.builtins.cpu_image import ensure_cpu_image
    from ephemera.builtins.tiny_model import ensure_tiny_model

    for name, fn in (("ensure_cpu_env (cached)", ensure_cpu_env),
                     ("ensure_tiny_model (cached)", ensure_tiny_model),
                     ("ensure_cpu_image (cached)", ensure_cpu_image)):
        fn()
        seconds, _ = timed(fn)
        print(f"{name + ':':25}{seconds * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
