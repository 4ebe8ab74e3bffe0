"""Vision-language models in the estimate: the vision tower counted per family, the
multimodal profiling vLLM runs, the job settings that bound it, and a plan that turns
down a GPU which holds the text decoder but not the whole model.

Parameter counts are the totals the Hugging Face hub shows from each checkpoint's
safetensors headers (model pages of Qwen/Qwen2-VL-7B-Instruct,
Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen3-VL-8B-Instruct,
google/gemma-3-27b-it, mistralai/Mistral-Small-3.1-24B-Instruct-2503); the configs are
in tests/model_configs.py. At 2 bytes a parameter an exact count is an exact
"Model loading took" figure for a bf16 checkpoint, less vLLM's rotary cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ephemera.errors import NoFittingOfferError
from ephemera.lifecycle.server import build_server_command
from ephemera.provider import Offer
from ephemera.sizing.estimate import GIB, analyse, estimate
from ephemera.sizing.modelconfig import TINY_VL_MODEL_CONFIG, ModelInfo, check_config
from ephemera.sizing.plan import make_plan
from ephemera.spec.job import Job
from tests.model_configs import (
    GEMMA3_27B,
    MISTRAL_SMALL_31,
    QWEN2_VL_7B,
    QWEN3_VL_4B,
    QWEN3_VL_8B,
    QWEN25_VL_7B,
)

A10G = 22.06   # GiB vLLM sees on an A10G (shared/reference)


def info(config: dict, model_id: str = "test/vl") -> ModelInfo:
    return ModelInfo(model_id=model_id, source="test", config=config)


def text_only(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "vision_config"}


@pytest.mark.parametrize("config, hub_total", [
    (QWEN2_VL_7B, 8_291_375_616),
    (QWEN25_VL_7B, 8_292_166_656),
    (QWEN3_VL_4B, 4_437_815_808),
    (QWEN3_VL_8B, 8_767_123_696),
    (GEMMA3_27B, 27_432_406_640),
    (MISTRAL_SMALL_31, 24_011_361_280),
], ids=["qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-4b", "qwen3-vl-8b", "gemma-3-27b", "mistral-small-3.1"])
def test_vision_language_parameter_counts_match_the_checkpoints(config, hub_total):
    est = estimate(info(config))
    assert est.parameters == hub_total
    assert est.exact_architecture
    assert est.vision_weights_gib_per_gpu > 0
    rotary = est.weights_gib - hub_total * 2 / GIB
    assert 0 <= rotary < 0.02 * est.weights_gib      # weights within 2 %


def test_qwen3_vl_8b_tower_is_576m_parameters_on_top_of_the_decoder():
    whole = estimate(info(QWEN3_VL_8B))
    decoder = estimate(info(text_only(QWEN3_VL_8B)))
    tower = whole.parameters - decoder.parameters
    assert tower == 576_388_336     # hub total less Qwen3-8B's 8_190_735_360 (same decoder)
    assert whole.vision_weights_gib_per_gpu == pytest.approx(tower * 2 / GIB)
    assert whole.kv_cache_bytes_per_token == decoder.kv_cache_bytes_per_token == 2 * 36 * 8 * 128 * 2


def test_awq_decoder_keeps_the_vision_tower_sixteen_bit():
    awq = {**QWEN3_VL_8B, "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128,
        "modules_to_not_convert": ["visual"]}}
    est = estimate(info(awq))
    assert est.vision_weights_gib_per_gpu == pytest.approx(576_388_336 * 2 / GIB)
    assert est.weights_gib < estimate(info(QWEN3_VL_8B)).weights_gib / 2
    covers_vision = {**awq, "quantization_config": {**awq["quantization_config"],
                                                    "modules_to_not_convert": ["lm_head"]}}
    assert estimate(info(covers_vision)).vision_weights_gib_per_gpu < est.vision_weights_gib_per_gpu / 2


def test_max_pixels_and_image_limits_bound_the_profiling_memory():
    base = dict(max_model_len=16384, gpu_memory_gib=A10G, gpu_name="A10G")
    full = estimate(info(QWEN3_VL_8B), **base)
    small = estimate(info(QWEN3_VL_8B), mm_processor_kwargs={"max_pixels": 1605632}, **base)
    qwen3_style = estimate(info(QWEN3_VL_8B), mm_processor_kwargs={"size": {"longest_edge": 1605632}},
                           **base)
    assert full.multimodal_profile_gib_per_gpu > 1.0
    assert small.multimodal_profile_gib_per_gpu < full.multimodal_profile_gib_per_gpu / 10
    assert qwen3_style.multimodal_profile_gib_per_gpu == small.multimodal_profile_gib_per_gpu
    assert any("1568 tokens" in n for n in small.notes)          # 1605632 / 16**2 / 4
    off = estimate(info(QWEN3_VL_8B), limit_mm_per_prompt={"image": 0, "video": 0}, **base)
    decoder = estimate(info(text_only(QWEN3_VL_8B)), **base)
    assert off.weights_gib_per_gpu == pytest.approx(decoder.weights_gib_per_gpu)
    assert off.multimodal_profile_gib_per_gpu == 0 and off.vision_weights_gib_per_gpu == 0
    assert any("text decoder only" in n for n in off.notes)


def qwen3_vl_job(model: str, **model_kw) -> Job:
    return Job.model_validate({
        "name": "vl", "image": "vllm/vllm-openai", "suite": {"command": "pytest"},
        "model": {"id": model, "max_model_len": 16384, **model_kw}, "timeout": "30m"})


def a10g() -> list[Offer]:
    return [Offer(provider="aws", instance_type="g5.xlarge", region="us-east-1", gpu="A10G",
                  gpu_count=1, gpu_memory_gib=A10G, vcpus=4, memory_gib=16, price_per_hour=1.006)]


def write_model(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_plan_rejects_a_gpu_that_holds_the_decoder_but_not_the_vision_model(tmp_path):
    decoder = make_plan(qwen3_vl_job(write_model(tmp_path, "text", text_only(QWEN3_VL_8B))), a10g())
    assert decoder.offer.instance_type == "g5.xlarge"
    with pytest.raises(NoFittingOfferError) as err:
        make_plan(qwen3_vl_job(write_model(tmp_path, "vl", QWEN3_VL_8B)), a10g())
    reason = err.value.rejected[0].reason
    assert "1.07 GiB vision tower" in reason and "multimodal profiling" in reason
    assert "g5.xlarge" in str(err.value)
    # Serving it as text only (no images) brings it back onto the same GPU.
    text_served = make_plan(qwen3_vl_job(write_model(tmp_path, "vl2", QWEN3_VL_8B),
                                         limit_mm_per_prompt={"image": 0, "video": 0}), a10g())
    assert text_served.estimate.vision_weights_gib_per_gpu == 0


def test_job_multimodal_settings_reach_the_vllm_command_line():
    job = qwen3_vl_job("Qwen/Qwen3-VL-8B-Instruct", limit_mm_per_prompt={"image": 2, "video": 0},
                       mm_processor_kwargs={"max_pixels": 1605632})
    argv = build_server_command(job, model_path="Qwen/Qwen3-VL-8B-Instruct",
                                tensor_parallel_size=1).argv
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image":2,"video":0}'
    assert argv[argv.index("--mm-processor-kwargs") + 1] == '{"max_pixels":1605632}'
    plain = build_server_command(qwen3_vl_job("m"), model_path="m", tensor_parallel_size=1).argv
    assert "--limit-mm-per-prompt" not in plain and "--mm-processor-kwargs" not in plain


@pytest.mark.parametrize("limits, named", [
    ({"images": 1}, "'images' is not a modality"),
    ({"image": -1}, "image: -1 is not a count"),
    ({"image": "two"}, "limit_mm_per_prompt"),
])
def test_bad_multimodal_limits_are_errors_naming_the_field(limits, named):
    with pytest.raises(ValueError) as err:
        qwen3_vl_job("m", limit_mm_per_prompt=limits)
    assert named in str(err.value) and "limit_mm_per_prompt" in str(err.value)


def test_the_tiny_vision_model_shape_is_modelled_exactly():
    check_config(TINY_VL_MODEL_CONFIG, "builtin")
    shape = analyse(info(TINY_VL_MODEL_CONFIG, "ephemera/tiny-vl"))
    assert shape.modelled and shape.vision is not None and shape.vision.family == "idefics3"
    assert shape.parameters == 654_592      # what its generator reports for the saved model


def test_an_unknown_vision_family_is_approximated_and_says_so():
    config = {**QWEN3_VL_8B, "model_type": "futurevl", "architectures": ["FutureVL"],
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}}
    est = estimate(info(config))
    assert not est.exact_architecture
    assert any("approximated as plain ViT blocks" in n for n in est.notes)


@pytest.mark.parametrize("vision, named", [
    ({"depth": 2, "hidden_size": 64, "patch_size": 0}, "vision_config.patch_size"),
    ({"depth": 2, "hidden_size": 64, "spatial_merge_size": 10**6}, "vision_config.spatial_merge_size"),
    ({"depth": 2, "hidden_size": 64, "deepstack_visual_indexes": 7}, "vision_config is not usable"),
])
def test_unusable_vision_fields_are_config_errors(tmp_path, vision, named):
    from ephemera.errors import ConfigError
    from ephemera.sizing.modelconfig import load_model

    with pytest.raises(ConfigError, match=named):
        estimate(load_model(write_model(tmp_path, "bad", {**QWEN3_VL_8B, "vision_config": vision})))
