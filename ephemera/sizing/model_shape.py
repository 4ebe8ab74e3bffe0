"""A model's shape for the estimate, read from its config: the weight scheme (dtype
and quantisation), parameter counts per GPU counted from the architecture (dense,
mixture-of-experts, latent attention, sliding-window and linear-attention layers,
vision towers), and the KV cache's per-token shape. Pure functions, no I/O. The
memory estimate built on it is :mod:`ephemera.sizing.estimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ephemera.errors import ConfigError
from ephemera.sizing.modelconfig import ModelInfo
from ephemera.sizing.vision import VisionTower, vision_tower

VOCAB_PAD = 64

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
_MOE = {"mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "qwen3_next"}
_MLA = {"deepseek_v2", "deepseek_v3", "kimi_k2"}
_HYBRID_LINEAR = {"qwen3_next"}
# Multimodal and renamed families whose text decoder is one of the above.
_ALIASES = {"qwen2_vl": "qwen2", "qwen2_vl_text": "qwen2", "qwen2_5_vl": "qwen2",
            "qwen2_5_vl_text": "qwen2", "qwen3_vl": "qwen3", "qwen3_vl_text": "qwen3",
            "qwen3_vl_moe": "qwen3_moe", "qwen3_vl_moe_text": "qwen3_moe", "mistral3": "mistral",
            "pixtral": "mistral", "llava": "llama", "llava_next": "llama", "idefics3": "llama",
            "smolvlm": "llama", "internvl": "qwen2", "internvl_chat": "qwen2",
            "gemma3": "gemma3_text", "kimi_k2": "deepseek_v3"}
# vLLM's hybrid KV cache manager (V1 engine, from the 0.10 releases on) gives
# sliding-window layers only the window's blocks; older releases, and
# --disable-hybrid-kv-cache-manager, give every layer the whole context.
HYBRID_KV_SINCE = "0.10"
MXFP4_BYTES = 4.25 / 8        # 4-bit values plus one 8-bit scale per 32



@dataclass(frozen=True)
class WeightScheme:
    """Bytes per parameter: ``linear`` for decoder linear layers, ``other`` for the rest."""

    name: str
    linear: float
    other: float
    activation: int            # bytes of the activation / KV "auto" dtype
    from_checkpoint: bool      # the checkpoint's own format (its files' bytes apply)
    expert: float | None = None    # bytes for MoE expert weights when they differ (MXFP4)
    vision_quantized: bool = False  # the checkpoint quantises the vision tower too


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
    kv_layers: int | None = None   # layers holding a full-context KV cache (default: all)
    mla_dim: int = 0               # MLA: kv_lora_rank + qk_rope_head_dim cached per layer
    sliding_layers: int = 0
    sliding_window: int = 0
    linear_state_bytes: int = 0    # per sequence, all linear-attention layers (one rank: / TP)
    vision: VisionTower | None = None
    vision_bytes: float = 0.0      # part of sharded_bytes
    multimodal_config: dict[str, Any] | None = None



# ----------------------------------------------------------------------------- config


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under text_config."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        text = config.get("llm_config")   # InternVL's original format
    if isinstance(text, dict):
        merged = {k: v for k, v in config.items()
                  if k not in ("text_config", "llm_config", "vision_config")}
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
        if method == "mxfp4":  # experts only: attention, router and embeddings stay 16-bit
            return WeightScheme("mxfp4 experts", other, other, other, True, expert=MXFP4_BYTES)
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


def _quantizes_vision(config: dict[str, Any] | None) -> bool:
    """A checkpoint's quantization config covers the vision tower only when it lists the
    modules it leaves out and the tower is not among them."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict) or not config or not isinstance(config.get("vision_config"), dict):
        return False
    skipped = qc.get("modules_to_not_convert") or qc.get("ignore") or qc.get("ignored_layers")
    if not isinstance(skipped, list):
        return False
    words = ("visual", "vision", "vit", "mm_projector", "multi_modal")
    return not any(isinstance(m, str) and any(w in m.lower() for w in words) for m in skipped)


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
    full: int = 0           # 16-bit, sharded (embeddings, lm_head)
    replicated: int = 0     # 16-bit, on every rank (norms, biases, router)
    expert: int = 0         # MoE expert matrices (part of linear unless the scheme says)
    active_linear: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.full + self.replicated


def _layer_kinds(cfg: dict[str, Any], mtype: str, layers: int) -> list[str]:
    """'full', 'sliding' or 'linear' for each decoder layer."""
    kinds = cfg.get("layer_types")
    if isinstance(kinds, list) and len(kinds) == layers:
        names = {"sliding_attention": "sliding", "linear_attention": "linear"}
        out = [names.get(str(k), "full") for k in kinds]
    elif mtype in _HYBRID_LINEAR:
        every = int(cfg.get("full_attention_interval") or 4)
        out = ["full" if (n + 1) % every == 0 else "linear" for n in range(layers)]
    elif mtype in ("gemma3", "gemma3_text"):
        every = int(cfg.get("sliding_window_pattern") or 6)
        out = ["full" if (n + 1) % every == 0 else "sliding" for n in range(layers)]
    elif mtype == "gemma2":
        out = ["sliding" if n % 2 == 0 else "full" for n in range(layers)]
    else:
        windowed = cfg.get("sliding_window") and (mtype not in _QKV_BIAS or cfg.get("use_sliding_window"))
        out = ["sliding" if windowed else "full"] * layers
    if not cfg.get("sliding_window"):
        out = ["full" if k == "sliding" else k for k in out]
    return out


def _attention(cfg: dict[str, Any], mtype: str, hidden: int, heads: int, kv: int,
               head_dim: int) -> tuple[int, int]:
    """(linear, replicated) parameters of one attention layer."""
    if mtype in _MLA:
        q_lora = int(cfg.get("q_lora_rank") or 0)
        kv_lora = int(cfg.get("kv_lora_rank") or 512)
        rope = int(cfg.get("qk_rope_head_dim") or 64)
        nope = int(cfg.get("qk_nope_head_dim") or 128)
        v_dim = int(cfg.get("v_head_dim") or 128)
        q = (hidden * q_lora + q_lora * heads * (nope + rope)) if q_lora else hidden * heads * (nope + rope)
        kv_part = hidden * (kv_lora + rope) + kv_lora * heads * (nope + v_dim)
        return q + kv_part + heads * v_dim * hidden, q_lora + kv_lora
    q_out, kv_out = heads * head_dim, kv * head_dim
    gate = q_out if mtype in _HYBRID_LINEAR else 0          # gated attention output
    linear = hidden * (q_out + gate) + 2 * hidden * kv_out + q_out * hidden
    bias = (q_out + 2 * kv_out) if (mtype in _QKV_BIAS or cfg.get("attention_bias")) else 0
    if mtype == "gpt_oss":
        bias += hidden + heads                              # o_proj bias, attention sinks
    qk_norm = 2 * head_dim if (mtype in _QK_NORM or mtype in _HYBRID_LINEAR) else 0
    return linear, bias + qk_norm


def _linear_attention(cfg: dict[str, Any], hidden: int) -> tuple[int, int, int]:
    """(linear, replicated, state bytes per sequence at 1 byte per value) of one Gated
    DeltaNet layer (Qwen3-Next): a recurrent state of value heads x key dim x value dim
    and a convolution state of (kernel - 1) x conv width."""
    kh, vh = int(cfg.get("linear_num_key_heads") or 16), int(cfg.get("linear_num_value_heads") or 32)
    kd, vd = int(cfg.get("linear_key_head_dim") or 128), int(cfg.get("linear_value_head_dim") or 128)
    kernel = int(cfg.get("linear_conv_kernel_dim") or 4)
    conv = 2 * kh * kd + vh * vd
    linear = hidden * (2 * kh * kd + 2 * vh * vd) + hidden * 2 * vh + vh * vd * hidden
    replicated = conv * kernel + 2 * vh + vd
    return linear, replicated, vh * kd * vd + (kernel - 1) * conv


def _moe_settings(cfg: dict[str, Any], mtype: str, inter: int) -> dict[str, int]:
    if mtype not in _MOE and mtype not in _MLA:
        return {"experts": 0}
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    moe_inter = int(cfg.get("moe_intermediate_size") or inter)
    if mtype in _MLA:
        shared = int(cfg.get("n_shared_experts") or 0) * moe_inter
    return {"experts": experts, "topk": int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0),
            "moe_inter": moe_inter, "shared": shared,
            "step": int(cfg.get("decoder_sparse_step") or cfg.get("moe_layer_freq") or 1),
            "first_dense": int(cfg.get("first_k_dense_replace") or 0)}


def _mlp(c: _Count, cfg: dict[str, Any], mtype: str, layer: int, hidden: int, inter: int,
         moe: dict[str, int]) -> int:
    """Adds one layer's MLP to ``c``; returns the MLP width one token passes through."""
    experts = moe["experts"]
    sparse = (experts > 0 and layer not in set(cfg.get("mlp_only_layers") or [])
              and layer >= moe.get("first_dense", 0) and (layer + 1) % moe["step"] == 0
              if mtype not in _MLA else experts > 0 and layer >= moe["first_dense"]
              and layer % moe["step"] == 0)
    if not sparse:
        c.linear += 3 * hidden * inter
        c.active_linear += 3 * hidden * inter
        c.replicated += (2 * inter + hidden) if cfg.get("mlp_bias") is True else 0
        return inter
    per_expert = 3 * hidden * moe["moe_inter"]
    c.linear += experts * per_expert + 3 * hidden * moe["shared"]
    c.expert += experts * per_expert
    c.active_linear += moe["topk"] * per_expert + 3 * hidden * moe["shared"]
    c.replicated += hidden * experts + (hidden if moe["shared"] and mtype not in _MLA else 0)
    if mtype == "gpt_oss":       # expert biases and the router's bias
        c.replicated += experts * (2 * moe["moe_inter"] + hidden) + experts
    if mtype == "deepseek_v3":   # e_score_correction_bias
        c.replicated += experts
    return moe["topk"] * moe["moe_inter"] + moe["shared"]


def _count(cfg: dict[str, Any], model: str, notes: list[str]) -> tuple[_Count, dict[str, Any], bool]:
    mtype = str(cfg.get("model_type", "")).lower()
    mtype = _ALIASES.get(mtype, mtype)
    arch = (cfg.get("architectures") or [mtype or "unknown"])[0]
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", model=model)
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", model=model)
    heads = _int(cfg, "num_attention_heads", "n_head", model=model)
    kv = _int(cfg, "num_key_value_heads", "multi_query_group_num", default=heads, model=model)
    head_dim = _int(cfg, "head_dim", default=hidden // max(heads, 1), model=model)
    vocab = _int(cfg, "vocab_size", "padded_vocab_size", model=model)
    inter = _int(cfg, "intermediate_size", "ffn_hidden_size", default=4 * hidden, model=model)
    modelled = mtype in _DENSE or mtype in _MOE or mtype in _MLA
    if not modelled:
        notes.append(f"architecture '{arch}' (model_type '{mtype}') is not modelled: counted as "
                     "a Llama-style decoder (attention + gated MLP + norms)")
    c = _Count()
    padded = math.ceil(vocab / VOCAB_PAD) * VOCAB_PAD
    tied = bool(cfg.get("tie_word_embeddings", mtype in _TIED_ALWAYS)) or mtype in _TIED_ALWAYS
    c.full += padded * hidden * (1 if tied else 2)
    kinds = _layer_kinds(cfg, mtype, layers)
    attn, attn_replicated = _attention(cfg, mtype, hidden, heads, kv, head_dim)
    norms = (4 if mtype in _FOUR_NORMS else 2) * hidden
    moe = _moe_settings(cfg, mtype, inter)
    state = 0
    active_inter = inter
    for layer, kind in enumerate(kinds):
        if kind == "linear":
            lin, rep, layer_state = _linear_attention(cfg, hidden)
            state += layer_state
            c.linear += lin
            c.active_linear += lin
            c.replicated += rep + norms
        else:
            c.linear += attn
            c.active_linear += attn
            c.replicated += attn_replicated + norms
        active_inter = _mlp(c, cfg, mtype, layer, hidden, inter, moe)
    c.replicated += hidden  # final norm
    mla_dim = (int(cfg.get("kv_lora_rank") or 512) + int(cfg.get("qk_rope_head_dim") or 64)
               if mtype in _MLA else 0)
    window = int(cfg.get("sliding_window") or 0)
    if window and "sliding" in kinds:
        notes.append(f"{kinds.count('sliding')} of {layers} layers use a {window}-token sliding "
                     f"window: vLLM {HYBRID_KV_SINCE} and later keep only the window's KV cache for "
                     "them (older releases, or --disable-hybrid-kv-cache-manager, keep the whole "
                     "context)")
    if mla_dim:
        notes.append(f"multi-head latent attention: the KV cache holds {mla_dim} values per layer "
                     "per token, the same on every tensor-parallel rank")
    if state:
        notes.append(f"{kinds.count('linear')} linear-attention layers hold a fixed state per "
                     "sequence instead of a KV cache")
    dims = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv,
            "head_dim": head_dim, "vocab": padded, "intermediate_active": active_inter,
            "kv_layers": kinds.count("full"), "mla_dim": mla_dim,
            "sliding_layers": kinds.count("sliding"), "sliding_window": window,
            "linear_state_bytes": state}
    return c, dims, modelled


def _tower(info: ModelInfo, text_hidden: int) -> VisionTower | None:
    """The vision tower, with a config whose vision fields cannot be used as a ConfigError."""
    try:
        return vision_tower(info.config or {}, text_hidden)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ConfigError(f"config.json of '{info.model_id}': vision_config is not usable "
                          f"({type(exc).__name__}: {str(exc)[:120]}).") from None


def _vision_bytes(tower: VisionTower | None, scheme: WeightScheme, quantized: bool,
                  notes: list[str]) -> float:
    """The tower at 16-bit (the activation dtype), unless the checkpoint quantises it."""
    if tower is None:
        return 0.0
    if not tower.modelled:
        notes.append("the vision encoder is approximated as plain ViT blocks")
    else:
        notes.append(f"vision tower ({tower.family}) counted: {tower.parameters:,} parameters")
    if quantized:
        return tower.linear * scheme.linear + (tower.parameters - tower.linear) * scheme.activation
    return float(tower.parameters * scheme.activation)


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
    tower = _tower(info, dims["hidden"])
    vision_bytes = _vision_bytes(tower, scheme, _quantizes_vision(info.config), notes)
    dims["linear_state_bytes"] *= scheme.activation
    linear, full, replicated = count.linear, count.full, count.replicated
    vision_params = tower.parameters if tower else 0
    parameters = count.total + vision_params
    active = count.active_linear + full + replicated + vision_params
    expert_bytes = scheme.expert if scheme.expert is not None else scheme.linear
    sharded = ((linear - count.expert) * scheme.linear + count.expert * expert_bytes
               + full * scheme.other + vision_bytes)
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
                linear = max(parameters - full - replicated - vision_params, 0)
                sharded = linear * scheme.linear + full * scheme.other + vision_bytes
    max_pos = cfg.get("max_position_embeddings")
    return Shape(
        model=info.model_id, architecture=arch, parameters=parameters,
        active_parameters=active, sharded_bytes=sharded, replicated_bytes=replicated_bytes,
        scheme=scheme, max_positions=int(max_pos) if max_pos else None, notes=tuple(notes),
        modelled=modelled and (tower is None or tower.modelled), vision=tower,
        vision_bytes=vision_bytes, multimodal_config=info.config if tower else None, **dims)


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
