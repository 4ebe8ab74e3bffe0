"""The weights phase against a loopback hub (tests/fixtures/loopback_hub.py): the download
itself (huggingface_hub into a hub cache, gated models need the token), and a docker run
whose image comes from a loopback registry while the weights come from the hub: the pull
and the download overlap (their phase start times), and the server is given the
snapshot's path inside the container, where the suite finds the files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ephemera.lifecycle.weights import HUB_MOUNT, download
from tests.fixtures.standin_targets import _env, _job
from tests.runlib import RunProcess
from tests.test_pull_progress import _forget, _through, pushed_image, registry, slow_registry  # noqa: F401

TOKEN = "hf_loopback_token_0123456789"

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 512,
    "max_position_embeddings": 256, "torch_dtype": "bfloat16",
}


def _files(size: int = 64 * 1024) -> dict[str, bytes]:
    return {"config.json": json.dumps(TINY_CONFIG).encode(),
            "model.safetensors": os.urandom(size), "tokenizer/tokenizer.json": b"{}"}


def test_download_puts_a_snapshot_at_a_path_fixed_by_the_revision(loopback_hub, tmp_path):
    repo = loopback_hub.add("org/tiny", _files())
    first = download("org/tiny", None, tmp_path / "hub", token=None, endpoint=loopback_hub.url)
    assert first == str(tmp_path / "hub" / "models--org--tiny" / "snapshots" / repo.commit)
    assert json.loads((Path(first) / "config.json").read_text())["hidden_size"] == 128
    assert (Path(first) / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"
    assert Path(first, "model.safetensors").is_symlink()   # into blobs/: the hub cache's layout
    gets = len([r for r in loopback_hub.requests if r[1] == "GET" and "/resolve/" in r[2]])
    again = download("org/tiny", None, tmp_path / "hub", token=None, endpoint=loopback_hub.url)
    assert again == first
    assert len([r for r in loopback_hub.requests if r[1] == "GET" and "/resolve/" in r[2]]) == gets


def test_a_gated_model_needs_the_token(loopback_hub, tmp_path):
    from huggingface_hub.errors import GatedRepoError

    loopback_hub.add("org/gated", _files(), token=TOKEN)
    with pytest.raises(GatedRepoError):
        download("org/gated", None, tmp_path / "none", token=None, endpoint=loopback_hub.url)
    path = download("org/gated", None, tmp_path / "hub", token=TOKEN, endpoint=loopback_hub.url)
    assert (Path(path) / "config.json").is_file()


@pytest.mark.timeout(300)
def test_pull_and_download_overlap_on_docker(pushed_image, slow_registry, loopback_hub,  # noqa: F811
                                            tmp_path):
    # Each layer of the image takes 2 s from the registry; each file 3 s from the hub.
    proxy = slow_registry(2.0)
    ref = _through(proxy, pushed_image)
    _forget(ref)
    _forget(pushed_image)
    loopback_hub.add("ephemera-test/tiny-hub", _files(), token=TOKEN, delay=3.0)
    cache = tmp_path / "hf-cache"
    job = _job(tmp_path, "docker", image=ref, python="python3",
               resources={"docker": {"network": "host"}})
    text = job.read_text()
    snapshots = f"{HUB_MOUNT}/hub/models--ephemera-test--tiny-hub/snapshots"
    text = text.replace("id: ephemera/tiny-llama", "id: ephemera-test/tiny-hub")
    text = text.replace("command: echo suite-started",
                        f"command: test -f {snapshots}/*/config.json && echo weights-found")
    text += f"cache:\n  weights: {cache}\nenv:\n  HF_TOKEN: {TOKEN}\n  HF_ENDPOINT: {loopback_hub.url}\n"
    job.write_text(text)
    env = _env(tmp_path, HF_ENDPOINT=loopback_hub.url, HF_TOKEN=TOKEN)
    run = RunProcess(job, env)
    code, result = run.finish(timeout=240)
    _forget(ref)
    assert code == 0, run.stderr[-4000:]
    phases = {p["name"]: p for p in result["phases"]}
    assert {"weights", "pull"} <= set(phases), phases
    # Start offsets and lengths, in seconds from the run's start (--json).
    w_start, w_end = phases["weights"]["start"], phases["weights"]["start"] + phases["weights"]["seconds"]
    p_start, p_end = phases["pull"]["start"], phases["pull"]["start"] + phases["pull"]["seconds"]
    assert w_start <= p_start < w_end and w_start < p_end, phases
    assert phases["weights"]["ok"] and phases["pull"]["seconds"] >= 2 and phases["weights"]["seconds"] >= 3
    assert f"--model {snapshots}/" in result["server_command"]
    suite_log = Path(result["artifacts_dir"]) / "suite.log"
    assert "weights-found" in suite_log.read_text()
    assert list(cache.glob("hub/models--ephemera-test--tiny-hub/snapshots/*/config.json"))
    assert TOKEN not in run.stderr
