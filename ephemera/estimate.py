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
from ephemera.modelconfig import ModelInfo

GIB = 2**30
BLOCK_TOKENS = 16
VOCAB_PAD = 64
SAMPLER_FACTOR = 9.7          # bytes of sampler buffers per float32 logit (see docstring)
NON_TORCH_GIB = {1: 0.13}     # TP=1; any TP > 1 uses NON_TORCH_TP_GIB
NON_TORCH_TP_GIB = 0.55
CUDA_CONTEXT_GIB = 0.5
CUDA_CONTEXT_TP_GIB = 1.0

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1,
             "BOOL": 1, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}

# Families whose configs are modelled exactly (model_type -> attention/norm details).
_QKV_BIAS = {"qwen2", "qwen2_moe"}
_QK_NORM = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2"}
_FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}
_TIED_ALWAYS = {"gemma", "gemma2", "gemma3", "gemma3_text"}
_DENSE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
          "phi3", "olmo2", "granite", "internlm2", "yi"}
_MOE = {"mixtral", "qwen3_moe", "qwen2_moe"}


@dataclass(frozen=True)
class WeightScheme:
    """Bytes per parameter: ``linear`` for decoder linear layers, ``other`` for the rest."""

    name: str
    linear: float
    other: float
    activation: int            # bytes of the activation / KV "auto" dtype
    from_checkpoint: bool      # the checkpoint's own format (its files' bytes apply)


@dataclass(frozen=True)
class Shape:
    """A model reduced to what memory depends on. Built once, estimated many times."""

    model: str
    architecture: str
    modelled: bool
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate_active: int       # MLP width one token passes through
    max_positions: int | None
    parameters: int
    active_parameters: int
    sharded_bytes: float           # split across tensor-parallel ranks
    replicated_bytes: float        # on every rank (norms, router, rotary cache)
    scheme: WeightScheme
    guessed: bool = False
    notes: tuple[str, ...] = ()


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


# ----------------------------------------------------------------------------- config


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under text_config."""
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
        merged.update(text)
        return merged
    return config


def _int(cfg: dict[str, Any], *names: str, default: int | None = None, model: str = "") -> int:
    for name in names:
        value = cfg.get(name)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config.json of '{model}': {name} must be a number, found {value!r}.")
            return int(value)
    if default is not None:
        return default
    raise ConfigError(f"config.json of '{model}' has no {names[0]}: cannot size the model.",
                      hint="A decoder config needs hidden_size, num_hidden_layers, "
                           "num_attention_heads and vocab_size.")


def _bytes_int4(bits: int, group: int) -> float:
    """Packed ``bits``-bit weights plus a 16-bit scale and a packed zero per group."""
    if group is None or group <= 0:
        return bits / 8
    return bits / 8 + (2 + bits / 8) / group


def weight_scheme(config: dict[str, Any] | None, precision: str, quantization: str | None,
                  notes: list[str]) -> WeightScheme:
    """Bytes per parameter. A quantization_config in config.json wins over the flags."""
    torch_dtype = str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "bfloat16")
    native = _DTYPE_BYTES.get(torch_dtype, 2)
    qc = (config or {}).get("quantization_config")
    if qc is None and config is not None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method"):
        method = str(qc["quant_method"]).lower()
        if precision not in ("bf16", "fp16") or quantization:
            notes.append(f"the checkpoint's quantization_config ({method}) overrides the precision flag")
        other = min(native, 2)
        if method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "auto-round", "autoround"):
            bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
            return WeightScheme(f"{method} int{bits} group {group}", _bytes_int4(bits, group), other, other, True)
        if method in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
            return WeightScheme(f"{method} (8-bit weights)", 1.0, other, other, True)
        if method == "modelopt":
            algo = str(qc.get("quant_algo", "FP8")).upper()
            linear = 0.5 + 1 / 16 if "FP4" in algo else 1.0
            return WeightScheme(f"modelopt {algo}", linear, other, other, True)
        if method == "compressed-tensors":
            return WeightScheme("compressed-tensors", _compressed_tensors_bytes(qc), other, other, True)
        if method == "bitsandbytes":
            linear = 1.0 if qc.get("load_in_8bit") else 0.5 + 1 / 64
            return WeightScheme("bitsandbytes", linear, other, other, True)
        if method == "mxfp4":
            return WeightScheme("mxfp4", 4.25 / 8, other, other, True)
        bits = qc.get("bits") or qc.get("num_bits")
        linear = int(bits) / 8 if isinstance(bits, int) else 0.5
        notes.append(f"quantization method '{method}' is not modelled: linear layers counted at "
                     f"{linear:g} bytes per parameter")
        return WeightScheme(method, linear, other, other, True)
    if quantization:
        q = quantization.lower()
        if q in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
            return WeightScheme("fp8 (online)", 1.0, 2, 2, False)
        if q in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
            return WeightScheme(f"{q} int4 group 128", _bytes_int4(4, 128), 2, 2, False)
        if q == "bitsandbytes":
            return WeightScheme("bitsandbytes 4-bit", 0.5 + 1 / 64, 2, 2, False)
    match precision:
        case "fp32":
            return WeightScheme("fp32", 4, 4, 4, native == 4)
        case "bf16" | "fp16":
            return WeightScheme(precision, 2, 2, 2, native == 2)
        case "fp8":
            return WeightScheme("fp8", 1.0, 2, 2, False)
        case "int8":
            return WeightScheme("int8", 1.0, 2, 2, False)
        case "int4":
            return WeightScheme("int4 group 128", _bytes_int4(4, 128), 2, 2, False)
    raise ConfigError(f"precision '{precision}' is not one of fp32, bf16, fp16, fp8, int8, int4.")


def _compressed_tensors_bytes(qc: dict[str, Any]) -> float:
    groups = qc.get("config_groups") or {}
    for group in groups.values():
        weights = (group or {}).get("weights") or {}
        bits = int(weights.get("num_bits", 8))
        if weights.get("type") == "float" or bits == 8:
            return bits / 8
        return _bytes_int4(bits, int(weights.get("group_size") or 128))
    return 1.0


# ----------------------------------------------------------------------------- counting


@dataclass
class _Count:
    linear: int = 0         # quantisable, sharded
    full: int = 0           # 16-bit, sharded (embeddings, lm_head, vision tower)
    replicated: int = 0     # 16-bit, on every rank (norms, biases, router)
    active_linear: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.full + self.replicated


def _count(cfg: dict[str, Any], model: str, notes: list[str]) -> tuple[_Count, dict[str, int], bool]:
    mtype = str(cfg.get("model_type", "")).lower()
    arch = (cfg.get("architectures") or [mtype or "unknown"])[0]
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", model=model)
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", model=model)
    heads = _int(cfg, "num_attention_heads", "n_head", model=model)
    kv = _int(cfg, "num_key_value_heads", "multi_query_group_num", default=heads, model=model)
    head_dim = _int(cfg, "head_dim", default=hidden // max(heads, 1), model=model)
    vocab = _int(cfg, "vocab_size", "padded_vocab_size", model=model)
    inter = _int(cfg, "intermediate_size", "ffn_hidden_size", default=4 * hidden, model=model)
    modelled = mtype in _DENSE or mtype in _MOE
    if not modelled:
        notes.append(f"architecture '{arch}' (model_type '{mtype}') is not modelled: counted as "
                     "a Llama-style decoder (attention + gated MLP + norms)")
    c = _Count()
    padded = math.ceil(vocab / VOCAB_PAD) * VOCAB_PAD
    tied = bool(cfg.get("tie_word_embeddings", mtype in _TIED_ALWAYS)) or mtype in _TIED_ALWAYS
    c.full += padded * hidden * (1 if tied else 2)
    q_out, kv_out = heads * head_dim, kv * head_dim
    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    attn_bias = (q_out + 2 * kv_out) if (mtype in _QKV_BIAS or cfg.get("attention_bias")) else 0
    qk_norm = 2 * head_dim if mtype in _QK_NORM else 0
    norms = (4 if mtype in _FOUR_NORMS else 2) * hidden
    mlp_bias = cfg.get("mlp_bias") is True

    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if mtype in _MOE else 0
    topk = int(cfg.get("num_experts_per_tok") or 0)
    moe_inter = int(cfg.get("moe_intermediate_size") or inter)
    shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
    sparse_step = int(cfg.get("decoder_sparse_step") or 1)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    active_inter = inter
    for layer in range(layers):
        c.linear += attn
        c.active_linear += attn
        c.replicated += attn_bias + qk_norm + norms
        sparse = experts > 0 and layer not in dense_only and (layer + 1) % sparse_step == 0
        if sparse:
            c.linear += experts * 3 * hidden * moe_inter + 3 * hidden * shared_inter
            c.active_linear += topk * 3 * hidden * moe_inter + 3 * hidden * shared_inter
            c.replicated += hidden * experts + (hidden if shared_inter else 0)
            active_inter = topk * moe_inter + shared_inter
        else:
            c.linear += 3 * hidden * inter
            c.active_linear += 3 * hidden * inter
            c.replicated += (2 * inter + hidden) if mlp_bias else 0
    c.replicated += hidden  # final norm
    vision = _vision_params(cfg if "vision_config" in cfg else {}, notes)
    c.full += vision
    dims = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv,
            "head_dim": head_dim, "vocab": padded, "intermediate_active": active_inter}
    return c, dims, modelled


def _vision_params(cfg: dict[str, Any], notes: list[str]) -> int:
    """A rough vision-tower count (ViT blocks) for multimodal checkpoints."""
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        return 0
    h = int(vc.get("hidden_size") or 0)
    i = int(vc.get("intermediate_size") or 4 * h)
    n = int(vc.get("num_hidden_layers") or vc.get("depth") or 0)
    if not (h and n):
        return 0
    notes.append("the vision encoder is approximated as plain ViT blocks")
    return n * (4 * h * h + 2 * h * i)


def _rotary_params(cfg: dict[str, Any], head_dim: int) -> int:
    positions = int(cfg.get("max_position_embeddings") or 0)
    factor = float(cfg.get("partial_rotary_factor") or 1.0)
    return positions * int(head_dim * factor)


def analyse(info: ModelInfo, *, precision: str = "bf16", quantization: str | None = None) -> Shape:
    """Reduce a model to a :class:`Shape` (parameter counts and bytes)."""
    notes: list[str] = list(info.notes)
    scheme = weight_scheme(info.config, precision, quantization, notes)
    if info.config is None:
        return _guess_shape(info, scheme, notes)
    cfg = _text_config(info.config)
    count, dims, modelled = _count(cfg, info.model_id, notes)
    arch = str((info.config.get("architectures") or [cfg.get("model_type", "unknown")])[0])
    rotary = _rotary_params(cfg, dims["head_dim"]) * scheme.activation
    linear, full, replicated = count.linear, count.full, count.replicated
    parameters = count.total
    active = count.active_linear + full + replicated
    sharded = linear * scheme.linear + full * scheme.other
    replicated_bytes = replicated * scheme.other + rotary
    st = info.safetensors_params
    if st:
        # I32/U8 hold packed 4-bit weights: their counts are not parameters.
        packed = any(d.upper() in ("I32", "U8") for d in st)
        if scheme.from_checkpoint:
            total_bytes = sum(n * _ST_BYTES.get(d.upper(), 2) for d, n in st.items())
            sharded = max(total_bytes - replicated * scheme.other, 0)
            notes.append("weights from the checkpoint's safetensors headers")
        if not packed:
            parameters = sum(st.values())
            if not scheme.from_checkpoint:
                linear = max(parameters - full - replicated, 0)
                sharded = linear * scheme.linear + full * scheme.other
    max_pos = cfg.get("max_position_embeddings")
    return Shape(
        model=info.model_id, architecture=arch, modelled=modelled, parameters=parameters,
        active_parameters=active, sharded_bytes=sharded, replicated_bytes=replicated_bytes,
        scheme=scheme, max_positions=int(max_pos) if max_pos else None, notes=tuple(notes),
        **dims)


def _guess_shape(info: ModelInfo, scheme: WeightScheme, notes: list[str]) -> Shape:
    """A bare size: weights from the count, a typical Llama-like shape for the rest."""
    params = int(info.parameter_count or 0)
    if params <= 0:
        raise ConfigError(f"model size '{info.model_id}' must be above zero.")
    billions = params / 1e9
    layers = max(2, round(16 * billions ** 0.38))
    embed_share = 0.0 if scheme.linear == scheme.other else 0.1
    sharded = params * ((1 - embed_share) * scheme.linear + embed_share * scheme.other)
    return Shape(
        model=info.model_id, architecture="unknown (bare size)", modelled=False, layers=layers,
        hidden=4096, heads=64, kv_heads=8, head_dim=128, vocab=128256, intermediate_active=14336,
        max_positions=None, parameters=params, active_parameters=params, sharded_bytes=sharded,
        replicated_bytes=0.0, scheme=scheme, guessed=True,
        notes=tuple(notes) + (f"guessed shape: {layers} layers, 8 KV heads of 128, vocab 128256",))


# ----------------------------------------------------------------------------- estimate


def vllm_defaults(gpu_memory_gib: float | None, gpu_name: str | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) vLLM's API server picks on this GPU."""
    mem = gpu_memory_gib or 0.0
    if mem >= 160:
        return 1024, 16384
    if mem >= 70 and "a100" not in (gpu_name or "").lower():
        return 1024, 8192
    return 256, 2048


def kv_bytes_per_token(shape: Shape, kv_cache_dtype: str, tensor_parallel_size: int = 1) -> int:
    """2 x layers x KV heads (per rank) x head_dim x dtype bytes."""
    dtype_bytes = 1 if kv_cache_dtype.startswith("fp8") else shape.scheme.activation
    heads = math.ceil(shape.kv_heads / tensor_parallel_size) if tensor_parallel_size > 1 else shape.kv_heads
    return 2 * shape.layers * heads * shape.head_dim * dtype_bytes


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
                   gpu_memory_gib: float | None = None, gpu_name: str | None = None) -> Estimate:
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
    weights_total = shape.sharded_bytes + shape.replicated_bytes
    weights_pg = shape.sharded_bytes / tp + shape.replicated_bytes
    kv_token = kv_bytes_per_token(shape, kv_cache_dtype)
    kv_token_pg = kv_bytes_per_token(shape, kv_cache_dtype, tp)
    request_tokens = math.ceil(max_model_len / BLOCK_TOKENS) * BLOCK_TOKENS
    kv_request_pg = request_tokens * kv_token_pg
    sampler = SAMPLER_FACTOR * min(seqs, tokens) * shape.vocab * 4
    forward = tokens * (4 * shape.hidden + 3 * shape.intermediate_active / tp) * shape.scheme.activation
    activation = max(sampler, forward)
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
        notes=notes)


def estimate(info: ModelInfo, *, precision: str = "bf16", quantization: str | None = None,
             **settings: Any) -> Estimate:
    """Estimate for a model without a GPU in mind. vLLM's defaults depend on the GPU,
    so when the result needs a large GPU the large-GPU defaults are applied."""
    shape = analyse(info, precision=precision, quantization=quantization)
    est = estimate_shape(shape, **settings)
    if settings.get("gpu_memory_gib") is None and est.required_gib_per_gpu >= 70:
        est = estimate_shape(shape, **{**settings, "gpu_memory_gib": est.required_gib_per_gpu})
    return est

