"""How much GPU memory vLLM needs for a model: pure functions, no I/O.

The model follows what vLLM does at start-up (all figures per GPU, GiB = 2**30 bytes):

1. Budget = ``gpu_memory_utilization`` x the GPU's total memory. The CUDA context
   (about 0.5 GiB, 1 GiB under tensor parallelism) lives outside the budget.
2. Weights, counted from the architecture: embeddings (once when tied), attention
   with grouped KV heads, q/k norms and biases where the family has them, gated MLPs,
   ALL experts of a mixture-of-experts layer, norms and lm_head. Quantisation (fp8,
   int8, AWQ/GPTQ int4 with its group scales and zeros) applies to the decoder's
   linear layers only; embeddings, norms and lm_head stay 16-bit. Under tensor
   parallelism the linear layers and embeddings are split, norms are replicated.
   The rotary cos/sin cache (max positions x rotary dim, 16-bit) is counted too: it
   is part of vLLM's "Model loading took" figure. When the hub gives safetensors
   parameter counts per dtype, they replace the architecture's count.
3. Activation peak of the profiling run. vLLM runs one forward pass of
   ``max_num_batched_tokens`` tokens and one sampler pass over ``max_num_seqs``
   rows of logits. With the default server settings the sampler's float32 logits
   and their sorted copies dominate: the measured peaks of Llama-3.1-8B (4.76 GiB)
   and Qwen3-32B (5.64 GiB, same at TP=1 and TP=2) are both 9.7 x seqs x vocab x 4
   bytes. The forward pass's hidden and MLP buffers are the fallback when larger.
   The peak does not shrink with tensor parallelism.
4. Non-torch memory: 0.13 GiB at TP=1, 0.55 GiB with TP > 1 (NCCL buffers).
5. KV cache = budget - weights - activation - non-torch. It must hold at least one
   request of ``max_model_len`` tokens (rounded up to vLLM's 16-token blocks), or
   vLLM refuses to start. Bytes per token per GPU =
   2 x layers x ceil(kv_heads / TP) x head_dim x KV dtype bytes.

vLLM's defaults for ``max_num_seqs`` / ``max_num_batched_tokens`` in the API server
depend on the GPU: 1024 / 16384 from 160 GiB, 1024 / 8192 from 70 GiB (not A100),
else 256 / 2048. An architecture that is not modelled is counted as a Llama-style
decoder (attention + gated MLP) and the estimate says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ephemera.errors import ConfigError
from ephemera.sizing.model_shape import Shape, analyse
from ephemera.sizing.modelconfig import ModelInfo
from ephemera.sizing.vision import multimodal_profile, vision_tower

GIB = 2**30
BLOCK_TOKENS = 16
SAMPLER_FACTOR = 9.7          # bytes of sampler buffers per float32 logit (see docstring)
NON_TORCH_GIB = {1: 0.13}     # TP=1; any TP > 1 uses NON_TORCH_TP_GIB
NON_TORCH_TP_GIB = 0.55
CUDA_CONTEXT_GIB = 0.5
CUDA_CONTEXT_TP_GIB = 1.0





@dataclass
class Estimate:
    model: str
    architecture: str
    precision: str
    parameters: int
    active_parameters: int
    weights_gib: float
    weights_gib_per_gpu: float
    kv_cache_dtype: str
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_token_per_gpu: int
    max_model_len: int
    kv_cache_gib_per_request_per_gpu: float
    activation_gib_per_gpu: float
    overhead_gib_per_gpu: float
    cuda_context_gib_per_gpu: float
    required_gib_per_gpu: float
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    exact_architecture: bool
    notes: list[str] = field(default_factory=list)
    vision_weights_gib_per_gpu: float = 0.0
    multimodal_profile_gib_per_gpu: float = 0.0
    sliding_window_kv_gib_per_request_per_gpu: float = 0.0
    linear_state_gib_per_request_per_gpu: float = 0.0

    def multimodal_detail(self) -> str:
        """' (with a X GiB vision tower and Y GiB of multimodal profiling)', or ''."""
        if not (self.vision_weights_gib_per_gpu or self.multimodal_profile_gib_per_gpu):
            return ""
        return (f" (the weights include a {self.vision_weights_gib_per_gpu:.2f} GiB vision tower and "
                f"the peak {self.multimodal_profile_gib_per_gpu:.2f} GiB of multimodal profiling: "
                "the largest dummy images through the encoder and their encoder cache)")

    @property
    def in_budget_gib_per_gpu(self) -> float:
        """What must fit inside the budget: weights, activation, overhead, one request."""
        return (self.weights_gib_per_gpu + self.activation_gib_per_gpu
                + self.overhead_gib_per_gpu + self.kv_cache_gib_per_request_per_gpu)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and key != "gpu_memory_utilization":
                out[key] = round(value, 4)
        return out


# ----------------------------------------------------------------------------- estimate


def vllm_defaults(gpu_memory_gib: float | None, gpu_name: str | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) vLLM's API server picks on this GPU."""
    mem = gpu_memory_gib or 0.0
    if mem >= 160:
        return 1024, 16384
    if mem >= 70 and "a100" not in (gpu_name or "").lower():
        return 1024, 8192
    return 256, 2048


def kv_bytes_per_token(shape: Shape, kv_cache_dtype: str, tensor_parallel_size: int = 1,
                       layers: int | None = None) -> int:
    """KV bytes per token of context in the full-attention layers: 2 x layers x KV heads
    (per rank) x head_dim x dtype bytes; with MLA, layers x (kv_lora_rank +
    qk_rope_head_dim) x dtype bytes on every rank."""
    dtype_bytes = 1 if kv_cache_dtype.startswith("fp8") else shape.scheme.activation
    if layers is None:
        layers = shape.layers if shape.kv_layers is None else shape.kv_layers
    if shape.mla_dim:
        return layers * shape.mla_dim * dtype_bytes
    heads = math.ceil(shape.kv_heads / tensor_parallel_size) if tensor_parallel_size > 1 else shape.kv_heads
    return 2 * layers * heads * shape.head_dim * dtype_bytes


def _image_limit(limit_mm_per_prompt: dict[str, Any] | None) -> int | None:
    """Images (and video frames) one prompt may carry; None when not limited."""
    if not limit_mm_per_prompt:
        return None
    total = 0
    for value in limit_mm_per_prompt.values():
        count = value.get("count", 1) if isinstance(value, dict) else value
        total += int(count) if isinstance(count, int | float) else 0
    return total


def valid_tensor_parallel_sizes(shape: Shape, max_size: int) -> list[int]:
    """TP sizes vLLM accepts: divisors of the attention heads whose KV heads split or
    replicate evenly, up to ``max_size``."""
    sizes = []
    for tp in range(1, max(max_size, 0) + 1):
        if shape.heads % tp:
            continue
        if tp <= shape.kv_heads and shape.kv_heads % tp:
            continue
        if tp > shape.kv_heads and tp % shape.kv_heads:
            continue
        sizes.append(tp)
    return sizes


def estimate_shape(shape: Shape, *, max_model_len: int = 4096, tensor_parallel_size: int = 1,
                   gpu_memory_utilization: float = 0.9, kv_cache_dtype: str = "auto",
                   max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                   gpu_memory_gib: float | None = None, gpu_name: str | None = None,
                   limit_mm_per_prompt: dict[str, Any] | None = None,
                   mm_processor_kwargs: dict[str, Any] | None = None) -> Estimate:
    """The memory one GPU needs for this shape with these server settings."""
    tp = tensor_parallel_size
    if tp < 1:
        raise ConfigError(f"tensor_parallel_size must be at least 1, found {tp}.")
    if tp > 1 and tp not in valid_tensor_parallel_sizes(shape, tp):
        raise ConfigError(
            f"tensor_parallel_size {tp} does not split the model's {shape.heads} attention heads "
            f"and {shape.kv_heads} KV heads evenly (vLLM refuses it).")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], found {gpu_memory_utilization}.")
    if max_model_len < 1:
        raise ConfigError(f"max_model_len must be positive, found {max_model_len}.")
    notes = list(shape.notes)
    if shape.max_positions and max_model_len > shape.max_positions:
        notes.append(f"max_model_len {max_model_len} is above the model's max_position_embeddings "
                     f"{shape.max_positions}: vLLM refuses it unless rope scaling allows it")
    seqs, tokens = vllm_defaults(gpu_memory_gib, gpu_name)
    seqs = max_num_seqs or seqs
    tokens = max_num_batched_tokens or tokens
    limit = _image_limit(limit_mm_per_prompt)
    vision_off = shape.vision is not None and limit == 0
    if vision_off:
        notes.append("limit_mm_per_prompt allows no images or videos: vLLM serves the text "
                     "decoder only and neither loads nor profiles the vision tower")
    vision_bytes = shape.vision_bytes if vision_off else 0.0
    weights_total = shape.sharded_bytes + shape.replicated_bytes - vision_bytes
    weights_pg = (shape.sharded_bytes - vision_bytes) / tp + shape.replicated_bytes
    kv_token = kv_bytes_per_token(shape, kv_cache_dtype)
    kv_token_pg = kv_bytes_per_token(shape, kv_cache_dtype, tp)
    request_tokens = math.ceil(max_model_len / BLOCK_TOKENS) * BLOCK_TOKENS
    window_tokens = min(request_tokens, math.ceil(shape.sliding_window / BLOCK_TOKENS + 1) * BLOCK_TOKENS)
    sliding_pg = window_tokens * kv_bytes_per_token(shape, kv_cache_dtype, tp, shape.sliding_layers)
    state_pg = shape.linear_state_bytes / tp
    kv_request_pg = request_tokens * kv_token_pg + sliding_pg + state_pg
    sampler = SAMPLER_FACTOR * min(seqs, tokens) * shape.vocab * 4
    forward = tokens * (4 * shape.hidden + 3 * shape.intermediate_active / tp) * shape.scheme.activation
    activation = max(sampler, forward)
    profile, mm_extra = None, 0.0
    if shape.vision is not None and not vision_off:
        tower = shape.vision
        if mm_processor_kwargs and shape.multimodal_config:
            tower = vision_tower(shape.multimodal_config, shape.hidden, mm_processor_kwargs) or tower
        profile = multimodal_profile(tower, max_model_len=max_model_len, max_num_batched_tokens=tokens,
                                     images_per_prompt=limit if limit is not None else 1,
                                     dtype_bytes=shape.scheme.activation)
        text_only = activation
        activation = max(activation + profile.encoder_cache_bytes, profile.encoder_peak_bytes)
        mm_extra = activation - text_only
        notes.append(f"multimodal profiling: {profile.items} dummy image(s) of "
                     f"{profile.tokens_per_image} tokens ({profile.patches_per_image} patches)")
    overhead = (NON_TORCH_GIB[1] if tp == 1 else NON_TORCH_TP_GIB) * GIB
    context = (CUDA_CONTEXT_GIB if tp == 1 else CUDA_CONTEXT_TP_GIB) * GIB
    inside = weights_pg + activation + overhead + kv_request_pg
    required = max(inside / gpu_memory_utilization, inside + context)
    precision = shape.scheme.name
    return Estimate(
        model=shape.model, architecture=shape.architecture, precision=precision,
        parameters=shape.parameters, active_parameters=shape.active_parameters,
        weights_gib=weights_total / GIB, weights_gib_per_gpu=weights_pg / GIB,
        kv_cache_dtype=kv_cache_dtype, kv_cache_bytes_per_token=kv_token,
        kv_cache_bytes_per_token_per_gpu=kv_token_pg, max_model_len=max_model_len,
        kv_cache_gib_per_request_per_gpu=kv_request_pg / GIB,
        activation_gib_per_gpu=activation / GIB, overhead_gib_per_gpu=overhead / GIB,
        cuda_context_gib_per_gpu=context / GIB, required_gib_per_gpu=required / GIB,
        tensor_parallel_size=tp, gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=seqs, max_num_batched_tokens=tokens, exact_architecture=shape.modelled,
        notes=notes, vision_weights_gib_per_gpu=(shape.vision_bytes - vision_bytes) / tp / GIB,
        multimodal_profile_gib_per_gpu=mm_extra / GIB,
        sliding_window_kv_gib_per_request_per_gpu=sliding_pg / GIB,
        linear_state_gib_per_request_per_gpu=state_pg / GIB)


def estimate(info: ModelInfo, *, precision: str = "bf16", quantization: str | None = None,
             **settings: Any) -> Estimate:
    """Estimate for a model without a GPU in mind. vLLM's defaults depend on the GPU,
    so when the result needs a large GPU the large-GPU defaults are applied."""
    shape = analyse(info, precision=precision, quantization=quantization)
    est = estimate_shape(shape, **settings)
    if settings.get("gpu_memory_gib") is None and est.required_gib_per_gpu >= 70:
        est = estimate_shape(shape, **{**settings, "gpu_memory_gib": est.required_gib_per_gpu})
    return est
