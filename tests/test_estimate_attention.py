"""Attention kinds whose KV cache is not 2 x layers x KV heads x head_dim: multi-head
latent attention, sliding-window layers, linear-attention layers, and MXFP4 experts.

KV figures follow from the configs (tests/model_configs.py) and vLLM's cache layout;
parameter counts are the published totals: DeepSeek-V3 671B (technical report),
DeepSeek-V2-Lite 15.7B (model card), gpt-oss-20b 20.91B (model card), Qwen3-Next-80B-A3B
"80B" (model card). gpt-oss-20b's checkpoint files hold 13,761,264,768 bytes (12.82 GiB:
MXFP4 experts, the rest bf16).
"""

from __future__ import annotations

import pytest

from ephemera.sizing.estimate import GIB, estimate
from ephemera.sizing.model_shape import HYBRID_KV_SINCE
from ephemera.sizing.modelconfig import ModelInfo
from tests.model_configs import (
    DEEPSEEK_V2_LITE,
    DEEPSEEK_V3,
    GEMMA3_27B,
    GPT_OSS_20B,
    QWEN3_NEXT_80B,
)


def info(config: dict) -> ModelInfo:
    return ModelInfo(model_id="test/model", source="test", config=config)


def test_mla_caches_the_latent_once_per_layer_on_every_rank():
    est = estimate(info(DEEPSEEK_V3), tensor_parallel_size=8)
    assert est.kv_cache_bytes_per_token == 61 * (512 + 64) * 2            # 70,272
    assert est.kv_cache_bytes_per_token_per_gpu == est.kv_cache_bytes_per_token
    assert est.parameters == pytest.approx(671e9, rel=0.001)
    assert est.active_parameters == pytest.approx(37e9, rel=0.03)
    assert est.exact_architecture and any("latent attention" in n for n in est.notes)
    lite = estimate(info(DEEPSEEK_V2_LITE))
    assert lite.kv_cache_bytes_per_token == 27 * 576 * 2
    assert lite.parameters == pytest.approx(15.7e9, rel=0.005)
    assert estimate(info(DEEPSEEK_V2_LITE), kv_cache_dtype="fp8").kv_cache_bytes_per_token == 27 * 576


def test_sliding_window_layers_hold_only_the_window():
    est = estimate(info(GEMMA3_27B), max_model_len=32768)
    full_layers = 62 // 6                                                # every sixth layer
    assert est.kv_cache_bytes_per_token == 2 * full_layers * 16 * 128 * 2
    window_tokens = 1024 + 16                                            # window + one block
    assert est.sliding_window_kv_gib_per_request_per_gpu == pytest.approx(
        window_tokens * 2 * (62 - full_layers) * 16 * 128 * 2 / GIB)
    assert est.kv_cache_gib_per_request_per_gpu == pytest.approx(
        32768 * est.kv_cache_bytes_per_token / GIB + est.sliding_window_kv_gib_per_request_per_gpu)
    assert any(f"vLLM {HYBRID_KV_SINCE} and later" in n for n in est.notes)
    short = estimate(info(GEMMA3_27B), max_model_len=512)               # shorter than the window
    assert short.sliding_window_kv_gib_per_request_per_gpu == pytest.approx(
        512 * 2 * 52 * 16 * 128 * 2 / GIB)


def test_gpt_oss_mxfp4_experts_and_alternating_windows():
    est = estimate(info(GPT_OSS_20B))
    assert est.parameters == pytest.approx(20.91e9, rel=0.001)
    assert est.precision == "mxfp4 experts"
    assert est.weights_gib == pytest.approx(13_761_264_768 / GIB, rel=0.02)
    assert est.kv_cache_bytes_per_token == 2 * 12 * 8 * 64 * 2           # the 12 full layers
    assert est.sliding_window_kv_gib_per_request_per_gpu == pytest.approx(144 * 2 * 12 * 8 * 64 * 2 / GIB)
    bf16 = estimate(info({k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"}))
    assert bf16.weights_gib > 2.8 * est.weights_gib


def test_linear_attention_layers_hold_a_fixed_state_per_sequence():
    est = estimate(info(QWEN3_NEXT_80B), max_model_len=65536)
    assert est.kv_cache_bytes_per_token == 2 * 12 * 2 * 256 * 2          # 12 of 48 layers
    state = 36 * (32 * 128 * 128 + 3 * (2 * 16 * 128 + 32 * 128)) * 2    # recurrent + conv
    assert est.linear_state_gib_per_request_per_gpu == pytest.approx(state / GIB)
    assert est.parameters == pytest.approx(80e9, rel=0.01)
    tp2 = estimate(info(QWEN3_NEXT_80B), max_model_len=65536, tensor_parallel_size=2)
    assert tp2.linear_state_gib_per_request_per_gpu == pytest.approx(state / 2 / GIB)
    assert any("linear-attention" in n for n in est.notes)
