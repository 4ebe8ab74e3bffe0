"""Compile caches kept across runs (ephemera/lifecycle/caches.py): ephemera's own key
picks the directory, and a directory whose manifest is not exactly the key's (another
vLLM version, another GPU type, corrupt) starts empty. The checks run through a real
shell on this machine (the local provider's channel), with a Python that finds a vLLM
distribution of the version under test; uploaded models land at a content-addressed
path and a second run reuses them."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ephemera_providers.local import LocalRemote

from ephemera.lifecycle import caches
from ephemera.provider import Capabilities, Offer, Runs
from ephemera.spec.jobfile import load_job
from ephemera.spec.settings import get_settings

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _offer(gpu: str | None) -> Offer:
    return Offer(provider="local", instance_type="x", region=None, gpu=gpu, gpu_count=1 if gpu else 0,
                 gpu_memory_gib=24.0 if gpu else 0.0, vcpus=4, memory_gib=16, price_per_hour=0.0)


def _run(tmp_path: Path, *, vllm: str = "0.32.0", gpu: str | None = None,
         compile_at: Path | None = None) -> SimpleNamespace:
    """What caches.prepare reads of a run, with a real channel and a Python whose
    importlib.metadata finds vllm ``vllm``."""
    site = tmp_path / f"site-{vllm}"
    dist = site / f"vllm-{vllm}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm}\n")
    loaded = load_job(JOBS / "local-cpu-smoke.yaml")
    job = loaded.job.model_copy(update={"cache": loaded.job.cache.model_copy(
        update={"compile": str(compile_at or tmp_path / "compile")})})
    logs: list[str] = []
    return SimpleNamespace(
        job=job, settings=get_settings(), caps=Capabilities(runs=Runs.THIS_MACHINE),
        offer=_offer(gpu), plan=None, remote=LocalRemote(tmp_path), python=sys.executable,
        workdir=str(tmp_path / "runs" / "run-1"), run_id="run-1",
        _with_path=lambda command: f"PYTHONPATH={site} {command}",
        _log=logs.append, logs=logs, reporter=SimpleNamespace(warn=logs.append))


def _prepare(run: SimpleNamespace, model: str = "/models/tiny-abc") -> tuple[str, Path]:
    env = caches.prepare(run, model)
    directory = Path(env["VLLM_CACHE_ROOT"]).parent
    return run.logs[-1], directory


def test_the_same_key_finds_its_cache_again(tmp_path):
    run = _run(tmp_path)
    note, directory = _prepare(run)
    assert ": new (vLLM 0.32.0, cpu)" in note
    (directory / "inductor" / "graph.bin").write_bytes(b"compiled")
    env = caches.prepare(run, "/models/tiny-abc")
    assert run.logs[-1].endswith("hit (vLLM 0.32.0, cpu)")
    assert env == {"VLLM_CACHE_ROOT": f"{directory}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{directory}/inductor"}
    assert (directory / "inductor" / "graph.bin").read_bytes() == b"compiled"


def test_a_cache_of_another_vllm_version_is_not_used(tmp_path):
    _, old = _prepare(_run(tmp_path, vllm="0.31.0"))
    (old / "inductor" / "graph.bin").write_bytes(b"compiled by 0.31")
    note, new = _prepare(_run(tmp_path, vllm="0.32.0"))
    assert new != old and "new" in note and not (new / "inductor" / "graph.bin").exists()
    # The old version's directory put where the new key points (copied, renamed): discarded.
    shutil.rmtree(new)
    shutil.copytree(old, new)
    note, again = _prepare(_run(tmp_path, vllm="0.32.0"))
    assert again == new and ": discarded (vLLM 0.32.0" in note
    assert not (new / "inductor" / "graph.bin").exists()
    assert json.loads((new / caches.MANIFEST).read_text())["fields"]["vllm"] == "0.32.0"


def test_a_cache_of_another_gpu_type_is_not_used(tmp_path):
    _, l4 = _prepare(_run(tmp_path, gpu="L4"))
    (l4 / "triton" / "kernel.cubin").write_bytes(b"sm_89")
    note, a100 = _prepare(_run(tmp_path, gpu="A100"))
    assert a100 != l4 and "new (vLLM 0.32.0, A100)" in note
    shutil.rmtree(a100)
    shutil.copytree(l4, a100)
    note, again = _prepare(_run(tmp_path, gpu="A100"))
    assert "discarded" in note and not (a100 / "triton" / "kernel.cubin").exists()
    env = caches.prepare(_run(tmp_path, gpu="A100"), "/models/tiny-abc")
    assert env["TRITON_CACHE_DIR"] == f"{a100}/triton"   # Triton's cache on GPUs only


@pytest.mark.parametrize("manifest", ["{not json", "", '{"format": 1, "key": "x", "fields": {}}'])
def test_a_corrupt_manifest_is_discarded(tmp_path, manifest):
    run = _run(tmp_path)
    _, directory = _prepare(run)
    (directory / "vllm" / "artefact").write_bytes(b"?")
    (directory / caches.MANIFEST).write_text(manifest)
    note, again = _prepare(run)
    assert again == directory and "discarded" in note
    assert not (directory / "vllm" / "artefact").exists()
    assert (directory / "vllm").is_dir() and (directory / "inductor").is_dir()


def test_the_key_follows_what_is_compiled(tmp_path):
    run = _run(tmp_path)
    base = caches.cache_key(caches.key_fields(run, "/m", "0.32.0"))
    assert caches.cache_key(caches.key_fields(run, "/m", "0.32.0")) == base
    assert caches.cache_key(caches.key_fields(run, "/other", "0.32.0")) != base
    eager = run.job.model_copy(update={"server": run.job.server.model_copy(update={"args": []})})
    run.job = eager
    assert caches.cache_key(caches.key_fields(run, "/m", "0.32.0")) != base


def test_caches_off_give_no_environment(tmp_path):
    run = _run(tmp_path)
    run.job = run.job.model_copy(update={"cache": run.job.cache.model_copy(update={"compile": None})})
    assert caches.prepare(run, "/m") == {}


def test_a_bad_volume_name_is_a_config_error(tmp_path):
    from ephemera.errors import ConfigError

    run = _run(tmp_path, compile_at=Path("bad name"))
    run.caps = Capabilities(runs=Runs.IMAGE)
    with pytest.raises(ConfigError, match="cache.compile"):
        caches.docker_volume(run)


def test_an_uploaded_model_lands_at_a_content_addressed_path_shared_by_runs(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"w" * 1000)
    first = _run(tmp_path)
    path = caches.upload_model(first, model, first.remote, timeout=60)
    assert path == str(tmp_path / "runs" / ".models" / f"tiny-{caches.model_digest(model)}")
    assert (Path(path) / "weights.bin").read_bytes() == b"w" * 1000
    second = _run(tmp_path)
    second.run_id = "run-2"
    assert caches.upload_model(second, model, second.remote, timeout=60) == path
    assert "already at" in second.logs[-1]
    (model / "weights.bin").write_bytes(b"v" * 1000)   # other content, other path
    assert caches.upload_model(second, model, second.remote, timeout=60) != path
    assert not list((tmp_path / "runs" / ".models").glob("*.part-*"))


def test_a_remembered_digest_stands_only_while_the_files_are_unchanged(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(b"a" * 100)
    memo = tmp_path / "digests.json"
    first = caches.model_digest(model, memo)
    assert first == caches.model_digest(model)
    real_open = Path.open

    def guarded(self, *args, **kwargs):
        assert model not in self.parents, f"{self} was read again"
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
    assert caches.model_digest(model, memo) == first        # unchanged: not read
    monkeypatch.setattr(Path, "open", real_open)
    # The same size and modification time with other bytes (as `cp -p` could leave):
    # the change time differs, so the files are read again.
    before = (model / "w.bin").stat()
    (model / "w.bin").write_bytes(b"b" * 100)
    os.utime(model / "w.bin", ns=(before.st_atime_ns, before.st_mtime_ns))
    second = caches.model_digest(model, memo)
    assert second != first and second == caches.model_digest(model)
    memo.write_text("{not json")                             # a damaged memo costs time only
    assert caches.model_digest(model, memo) == second
    assert json.loads(memo.read_text())[str(model.resolve())]["digest"] == second


def test_a_machine_booted_from_a_baked_image_uses_the_caches_baked_into_it(tmp_path):
    from ephemera.lifecycle import weights

    run = _run(tmp_path)
    run.job = run.job.model_copy(update={"cache": run.job.cache.model_copy(
        update={"compile": None, "weights": None})})
    run.caps = Capabilities(runs=Runs.MACHINE)
    assert caches.compile_root(run) is None and weights._location(run) is None
    run.plan = SimpleNamespace(machine_image={"id": "ami-0123", "key": "k"})
    assert caches.compile_root(run) == str(tmp_path / "runs" / ".cache" / "compile")
    assert weights._location(run) == "auto"
    named = tmp_path / "elsewhere"
    run.job = run.job.model_copy(update={"cache": run.job.cache.model_copy(update={"compile": str(named)})})
    assert caches.compile_root(run) == str(named)      # a job's own place still wins
