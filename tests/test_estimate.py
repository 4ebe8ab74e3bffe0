"""The estimator against what vLLM measured (tests/data/reference-models) and known
public facts: weights within 2 %, KV bytes per token exact, the known failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ephemera.errors import ConfigError, TransientError
from ephemera.sizing.estimate import (
    GIB,
    analyse,
    estimate,
    estimate_shape,
    valid_tensor_parallel_sizes,
)
from ephemera.sizing.modelconfig import (
    TINY_MODEL_ID,
    ModelInfo,
    load_model,
    parse_size,
    resolve_model_dir,
)

REF = Path(__file__).parent / "data" / "reference-models"
MEASURED = list(csv.DictReader((REF / "measured.csv").open()))
H100, A100_40, L40S = 79.18, 39.56, 44.40


def cfg(**kw) -> ModelInfo:
    return ModelInfo(model_id=kw.pop("_id", "test/model"), source="test", config=kw)


from tests.model_configs import GEMMA_7B, LLAMA_70B, MIXTRAL, QWEN3_32B, QWEN25_72B  # noqa: E402


@pytest.mark.parametrize("row", MEASURED, ids=[r["model"] for r in MEASURED])
def test_weights_within_two_percent_of_vllm(row):
    info = load_model(str(REF / row["model"]))
    est = estimate(info, tensor_parallel_size=int(row["tensor_parallel_size"]))
    measured = float(row["model_loading_gib_per_gpu"])
    assert abs(est.weights_gib_per_gpu / measured - 1) < 0.02, (est.weights_gib_per_gpu, measured)


@pytest.mark.parametrize("name", [r["model"] for r in MEASURED])
def test_kv_bytes_per_token_exact(name):
    config = json.loads((REF / name / "config.json").read_text())
    expected = (2 * config["num_hidden_layers"] * config["num_key_value_heads"]
                * config["head_dim"] * 2)
    est = estimate(load_model(str(REF / name)))
    assert est.kv_cache_bytes_per_token == expected
    fp8 = estimate(load_model(str(REF / name)), kv_cache_dtype="fp8")
    assert fp8.kv_cache_bytes_per_token == expected // 2


def test_qwen3_4b_kv_bytes_match_the_vllm_log():
    # "KV cache 34.72 GiB held 252800 tokens (147456 bytes per token)"
    est = estimate(load_model(str(REF / "Qwen3-4B-Instruct-2507")))
    assert est.kv_cache_bytes_per_token == 147456
    assert abs(252800 * 147456 / GIB - 34.72) < 0.01


def test_llama_8b_on_h100_reproduces_the_measured_breakdown():
    # H100, util 0.9: budget 71.26 GiB, activation 4.76, non-torch 0.13, KV 51.38 GiB.
    shape = analyse(load_model(str(REF / "Llama-3.1-8B-Instruct")))
    est = estimate_shape(shape, gpu_memory_gib=H100, gpu_name="H100")
    assert est.max_num_seqs == 1024 and est.max_num_batched_tokens == 8192
    assert est.activation_gib_per_gpu == pytest.approx(4.76, rel=0.02)
    assert est.overhead_gib_per_gpu == pytest.approx(0.13)
    kv = 0.9 * H100 - est.weights_gib_per_gpu - est.activation_gib_per_gpu - est.overhead_gib_per_gpu
    assert kv == pytest.approx(51.38, rel=0.01)


def test_qwen3_30b_moe_counts_every_expert():
    est = estimate(load_model(str(REF / "Qwen3-30B-A3B")))
    assert est.parameters == pytest.approx(30.5e9, rel=0.01)       # public: 30.5B total
    assert est.active_parameters == pytest.approx(3.3e9, rel=0.05)  # public: 3.3B active
    assert est.weights_gib > 55


def test_awq_checkpoint_overrides_the_precision_flag():
    est = estimate(load_model(str(REF / "Qwen3-8B-AWQ")), precision="bf16")
    assert est.precision.startswith("awq int4 group 128")
    assert est.weights_gib == pytest.approx(5.7071, rel=0.02)
    flagged = estimate(load_model(str(REF / "Qwen3-8B-AWQ")), precision="fp8")
    assert flagged.weights_gib == est.weights_gib
    assert any("overrides" in n for n in flagged.notes)


def test_llama_70b_fp8_is_67_72_gib_and_cannot_fit_one_h100():
    est = estimate(cfg(**LLAMA_70B), precision="fp8", gpu_memory_gib=H100, gpu_name="H100")
    assert est.weights_gib == pytest.approx(67.72, rel=0.02)
    assert est.required_gib_per_gpu > H100


def test_int4_and_fp8_keep_embeddings_sixteen_bit():
    bf16 = estimate(cfg(**LLAMA_70B))
    fp8 = estimate(cfg(**LLAMA_70B), precision="fp8")
    int4 = estimate(cfg(**LLAMA_70B), precision="int4")
    embed_gib = 2 * 128256 * 8192 * 2 / GIB
    assert fp8.weights_gib == pytest.approx((bf16.weights_gib - embed_gib) / 2 + embed_gib, rel=0.01)
    assert int4.weights_gib == pytest.approx((bf16.weights_gib - embed_gib) * 0.5195 / 2 + embed_gib,
                                             rel=0.01)


def test_qwen25_72b_tp4_is_33_98_gib_per_gpu():
    est = estimate(cfg(**QWEN25_72B), tensor_parallel_size=4)
    assert est.parameters == pytest.approx(72.7e9, rel=0.01)
    assert est.weights_gib_per_gpu == pytest.approx(33.98, rel=0.02)
    assert est.kv_cache_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert est.kv_cache_bytes_per_token_per_gpu == 2 * 80 * 2 * 128 * 2


def test_qwen3_32b_leaves_4_45_gib_for_kv_on_one_h100():
    est = estimate(cfg(**QWEN3_32B), max_model_len=32768, gpu_memory_gib=H100, gpu_name="H100")
    assert est.activation_gib_per_gpu == pytest.approx(5.64, rel=0.02)
    left = 0.9 * H100 - est.weights_gib_per_gpu - est.activation_gib_per_gpu - est.overhead_gib_per_gpu
    assert left == pytest.approx(4.45, abs=0.15)
    assert est.kv_cache_gib_per_request_per_gpu == pytest.approx(8.0)
    assert est.required_gib_per_gpu > H100
    tp2 = estimate(cfg(**QWEN3_32B), tensor_parallel_size=2, gpu_memory_gib=H100, gpu_name="H100")
    assert tp2.activation_gib_per_gpu == est.activation_gib_per_gpu  # does not shrink with TP
    assert tp2.overhead_gib_per_gpu == pytest.approx(0.55)


def test_mixtral_and_gemma_match_public_parameter_counts():
    assert estimate(cfg(**MIXTRAL)).parameters == pytest.approx(46.7e9, rel=0.01)
    gemma = estimate(cfg(**GEMMA_7B))
    assert gemma.parameters == pytest.approx(8.54e9, rel=0.01)  # tied embeddings, counted once
    assert gemma.exact_architecture


def test_unknown_architecture_is_approximated_and_says_so():
    est = estimate(cfg(**{**LLAMA_70B, "model_type": "futurelm", "architectures": ["FutureLM"]}))
    assert not est.exact_architecture
    assert any("not modelled" in n for n in est.notes)
    assert est.parameters == estimate(cfg(**LLAMA_70B)).parameters


def test_safetensors_counts_replace_the_architecture_count():
    info = load_model(str(REF / "Qwen3-8B"))
    # The checkpoint holds 16381516776 bytes of files (a few KB of it headers).
    exact = ModelInfo(model_id="Qwen/Qwen3-8B", source="hub", config=info.config,
                      safetensors_params={"BF16": 8_190_735_360})
    est = estimate(exact)
    assert est.parameters == 8_190_735_360
    assert est.weights_gib == pytest.approx(15.2683, rel=0.005)
    assert any("safetensors" in n for n in est.notes)
    fp8 = estimate(exact, precision="fp8")
    assert fp8.weights_gib < est.weights_gib * 0.6


def test_bare_size_gives_weights_and_says_the_rest_is_a_guess():
    assert parse_size("7B") == 7_000_000_000 and parse_size("0.5b") == 500_000_000
    assert parse_size("org/model") is None
    est = estimate(load_model("7B"))
    assert est.weights_gib == pytest.approx(7e9 * 2 / GIB)
    assert any("guess" in n for n in est.notes)


def test_tensor_parallel_sizes_follow_the_heads():
    shape = analyse(load_model(str(REF / "Llama-3.1-8B-Instruct")))
    assert valid_tensor_parallel_sizes(shape, 8) == [1, 2, 4, 8]
    odd = analyse(cfg(**{**LLAMA_70B, "num_attention_heads": 40, "num_key_value_heads": 8}))
    assert valid_tensor_parallel_sizes(odd, 8) == [1, 2, 4, 8]
    with pytest.raises(ConfigError, match="tensor_parallel_size 3"):
        estimate(cfg(**LLAMA_70B), tensor_parallel_size=3)


def test_missing_config_field_is_named():
    bad = {k: v for k, v in LLAMA_70B.items() if k != "num_hidden_layers"}
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        estimate(cfg(**bad))


def write_config(tmp_path: Path, config: dict | str) -> str:
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "config.json").write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("change, named", [
    ({"hidden_size": 10**30}, "hidden_size must be a whole number from 1 to 262144, found 1000000000000000000000000000000"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a whole number from 1 to 16384, found 0"),
    ({"num_key_value_heads": -8}, "num_key_value_heads"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"vocab_size": 1.5}, "vocab_size"),
    ({"vocab_size": "128256"}, "vocab_size must be a whole number from 1 to 16777216, found the string '128256'"),
    ({"intermediate_size": True}, "intermediate_size"),
    ({"max_position_embeddings": float("inf")}, "max_position_embeddings"),
    ({"head_dim": None, "num_attention_heads": 8192, "hidden_size": 4096}, "smaller than num_attention_heads"),
    ({"text_config": {"hidden_size": 0}}, "text_config.hidden_size"),
    ({"text_config": []}, "text_config must be an object"),
    ({"vision_config": {"hidden_size": -1, "num_hidden_layers": 2}}, "vision_config.hidden_size"),
    ({"quantization_config": {"quant_method": "awq", "bits": None}}, "quantization_config.bits"),
    ({"quantization_config": {"quant_method": "gptq", "group_size": 10**12}}, "quantization_config.group_size"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": []}}, "config_groups"),
    ({"architectures": {"a": 1}}, "architectures must be a list of names"),
    ({"mlp_only_layers": [[1]]}, "mlp_only_layers"),
    ({"partial_rotary_factor": float("nan")}, "partial_rotary_factor"),
])
def test_implausible_config_sizes_are_errors_naming_the_field(tmp_path, change, named):
    config = {k: v for k, v in {**LLAMA_70B, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        load_model(write_config(tmp_path, config))
    assert named in str(info.value) and "config.json" in str(info.value)
    assert info.value.exit_code == 2


def test_every_reference_config_passes_the_checks(tmp_path):
    from ephemera.sizing.modelconfig import TINY_MODEL_CONFIG, check_config

    for config in [TINY_MODEL_CONFIG, LLAMA_70B, QWEN25_72B, QWEN3_32B, MIXTRAL, GEMMA_7B,
                   *(json.loads((d / "config.json").read_text()) for d in REF.iterdir() if d.is_dir())]:
        check_config(config, "test")


@pytest.mark.parametrize("text, named", [
    ('{"hidden_size": ' + "9" * 5000 + "}", "not a usable JSON document"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not a usable JSON document"),
    ("\ufeff" + json.dumps(LLAMA_70B).replace("8192", "0", 1), "hidden_size"),
])
def test_unusable_json_is_a_config_error(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named):
        load_model(write_config(tmp_path, text))


def test_a_bare_size_beyond_100t_is_an_error():
    assert parse_size("100T") == 10**14
    for text in ("101T", "9" * 400 + "B"):
        with pytest.raises(ConfigError, match="above 100T parameters"):
            load_model(text)


def test_non_utf8_and_oversized_configs_are_config_errors(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_model(str(tmp_path))
    with (tmp_path / "config.json").open("wb") as fh:
        fh.truncate(17 * 2**20)
    with pytest.raises(ConfigError, match="larger than 16 MiB"):
        load_model(str(tmp_path))


def test_model_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("EPHEMERA_CACHE_DIR", str(tmp_path / "cache"))
    from ephemera.spec.settings import reset_settings

    reset_settings()
    assert resolve_model_dir(TINY_MODEL_ID) == tmp_path / "cache" / "models" / "tiny-llama"
    assert resolve_model_dir("Qwen/Qwen3-8B") is None
    assert resolve_model_dir(str(REF / "Qwen3-8B")) == REF / "Qwen3-8B"
    tiny = load_model(TINY_MODEL_ID)  # not built yet: its known shape
    assert tiny.source == "builtin" and tiny.config["hidden_size"] == 128
    built = tmp_path / "cache" / "models" / "tiny-llama"
    built.mkdir(parents=True)
    (built / "config.json").write_text(json.dumps({**tiny.config, "vocab_size": 400}))
    assert load_model(TINY_MODEL_ID).config["vocab_size"] == 400


def test_local_model_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"hidden_size": 1,\n oops}')
    with pytest.raises(ConfigError, match=r"config.json line 2"):
        load_model(str(tmp_path))
    with pytest.raises(ConfigError, match="neither a local directory"):
        load_model("not a model id")


def test_hub_unreachable_is_a_transient_error(monkeypatch, tmp_path):
    # Imported before the variable is set: the library reads it once, at import, and
    # the value monkeypatch puts back afterwards must be the one other tests had.
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("EPHEMERA_CACHE_DIR", str(tmp_path / "cache"))
    from ephemera.spec.settings import reset_settings

    reset_settings()
    with pytest.raises(TransientError, match="not cached"):
        load_model("some-org/some-model", metadata=False)


def test_estimate_command_json():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ephemera", "estimate", str(REF / "Qwen3-8B"),
                          "--json", "--tensor-parallel-size", "2", "--max-model-len", "8192"],
                         capture_output=True, text=True, check=True, timeout=60)
    doc = json.loads(out.stdout)
    for key in ("parameters", "weights_gib", "weights_gib_per_gpu", "kv_cache_bytes_per_token",
                "activation_gib_per_gpu", "overhead_gib_per_gpu", "required_gib_per_gpu",
                "tensor_parallel_size"):
        assert key in doc
    assert doc["tensor_parallel_size"] == 2 and doc["kv_cache_bytes_per_token"] == 147456
    bad = subprocess.run([sys.executable, "-m", "ephemera", "estimate", "x y"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "neither a local directory" in bad.stderr
