"""Find and read a model's ``config.json``: what the estimator needs to know about a model.

A model is named in one of four ways:

- ``ephemera/tiny-llama``: the built-in tiny model, made under ``cache_dir/models``.
  Until it has been made, its known shape is used, so a plan never needs the files.
- a local directory holding ``config.json`` (a path that exists wins over a hub id);
- a Hugging Face repo id (``org/name``): ``config.json`` is fetched with
  ``hf_hub_download`` into ``cache_dir/hf`` (``HF_TOKEN`` is honoured by the hub
  client), and the safetensors metadata gives exact parameter counts per dtype when
  the hub can be reached;
- a bare size such as ``7B`` or ``0.5B``: parameters only, everything else is guessed.

Hub failures never escape as tracebacks: a missing or gated repo is a ConfigError
(nothing can fix it by retrying), a network failure is a TransientError.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError, TransientError
from ephemera.spec.settings import get_settings

TINY_MODEL_ID = "ephemera/tiny-llama"
TINY_VL_MODEL_ID = "ephemera/tiny-vl"

# The shape ephemera.builtins.tiny_model builds (a LlamaConfig), used before the files exist.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 384,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

# The shape of its vision sibling (an Idefics3Config), used before the files exist.
TINY_VL_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "scale_factor": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "text_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "head_dim": 64, "vocab_size": 384, "max_position_embeddings": 1024,
                    "tie_word_embeddings": True},
    "vision_config": {"model_type": "idefics3_vision", "hidden_size": 128,
                      "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 56, "patch_size": 14},
}
_BUILTIN = {TINY_MODEL_ID: ("tiny-llama", TINY_MODEL_CONFIG),
            TINY_VL_MODEL_ID: ("tiny-vl", TINY_VL_MODEL_CONFIG)}

# A config.json from the hub is data someone else wrote. Every size the estimator
# reads must be a whole number in these bounds: each lies far above any published
# model (hidden 16384, 126 layers, 256k vocab, 10M context) yet low enough that the
# estimate stays a finite figure computed in milliseconds. (field: (least, most))
MAX_CONFIG_BYTES = 16 * 2**20
_SIZES: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model"), (1, 2**18)),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers"), (1, 4096)),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads",
                     "multi_query_group_num"), (1, 2**14)),
    "head_dim": (1, 2**16),
    **dict.fromkeys(("vocab_size", "padded_vocab_size"), (1, 2**24)),
    **dict.fromkeys(("intermediate_size", "ffn_hidden_size"), (1, 2**22)),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), (0, 2**22)),
    "max_position_embeddings": (1, 2**28),
    **dict.fromkeys(("num_experts", "num_local_experts", "num_experts_per_tok"), (0, 2**14)),
    "decoder_sparse_step": (0, 4096),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                     "v_head_dim", "linear_key_head_dim", "linear_value_head_dim"), (0, 2**16)),
    **dict.fromkeys(("n_routed_experts", "n_shared_experts", "linear_num_key_heads",
                     "linear_num_value_heads"), (0, 2**14)),
    **dict.fromkeys(("first_k_dense_replace", "linear_conv_kernel_dim"), (0, 4096)),
    **dict.fromkeys(("moe_layer_freq", "full_attention_interval", "sliding_window_pattern"), (1, 4096)),
    "sliding_window": (0, 2**28),
}
_VISION_SIZES = {"hidden_size": (0, 2**18), "intermediate_size": (0, 2**22),
                 "num_hidden_layers": (0, 4096), "depth": (0, 4096), "embed_dim": (0, 2**18),
                 "out_hidden_size": (0, 2**18), "patch_size": (1, 4096), "image_size": (1, 2**16),
                 "spatial_merge_size": (1, 64), "temporal_patch_size": (1, 64),
                 "num_position_embeddings": (0, 2**24)}
_QUANT_SIZES = {"bits": (1, 32), "w_bit": (1, 32), "num_bits": (1, 32),
                "group_size": (-1, 2**20), "q_group_size": (-1, 2**20)}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.IGNORECASE)
_SIZE_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model: its config (None for a bare size), where it came
    from, and the checkpoint's parameter counts per dtype when the hub gave them."""

    model_id: str
    source: str                                   # "builtin", "local dir X", "hub", "size"
    config: dict[str, Any] | None = None
    parameter_count: int | None = None           # a bare size's figure
    safetensors_params: dict[str, int] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


MAX_PARAMETERS = 10**14     # 100T: a hundred times the largest published model


def parse_size(text: str) -> int | None:
    """``7B`` -> 7_000_000_000; None when the text is not a bare size. A size above
    :data:`MAX_PARAMETERS` is a ConfigError."""
    match = _SIZE_RE.match(text)
    if not match:
        return None
    count = float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if not count <= MAX_PARAMETERS:  # also inf, from a number of hundreds of digits
        raise ConfigError(f"model size '{text[:40]}' is above {MAX_PARAMETERS // 10**12}T parameters: "
                          "not a model that fits any machine.")
    return int(round(count))


def resolve_model_dir(model_id: str) -> Path | None:
    """The local directory for a model id: the tiny model's cache dir, an existing
    directory, or None for a hub id (or a bare size)."""
    if model_id in _BUILTIN:
        return get_settings().cache_dir / "models" / _BUILTIN[model_id][0]
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if model_id.startswith(("/", "./", "../", "~")):
        return path  # meant as a path: the loader says it is missing
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one config.json, with errors that name the file, and check the sizes the
    estimator reads (:func:`check_config`)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"model config {path} is larger than "
                              f"{MAX_CONFIG_BYTES // 2**20} MiB: not a config.json.")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"model config {path} does not exist.",
                          hint="A local model directory must hold the model's config.json.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (at byte {exc.start}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}).") from None
    except (ValueError, RecursionError) as exc:  # a number of 5,000 digits; nesting
        raise ConfigError(f"{path}: not a usable JSON document ({type(exc).__name__}: "
                          f"{str(exc)[:120]}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    check_config(data, str(path))
    return data


def check_config(config: dict[str, Any], where: str) -> None:
    """Refuse a config whose sizes the estimator cannot use: each must be a whole
    number within its bound in ``_SIZES`` (a hidden size of 10**30 or zero attention
    heads is an error naming the field, not an estimate)."""
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ConfigError(f"{where}: text_config must be an object, found {_kind(text)}.")
    for prefix, holder in (("", config), ("text_config.", text or {})):
        _check_sizes(holder, _SIZES, where, prefix)
        _check_types(holder, where, prefix)
        _check_vision(holder.get("vision_config"), where, prefix)
        _check_quantization(holder.get("quantization_config"), where, prefix)
    _check_heads({**config, **(text or {})}, where)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int) and abs(value) >= 10**40:
        return f"a number of {len(str(abs(value)))} digits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def _whole(value: Any, name: str, bounds: tuple[int, int], where: str) -> int:
    least, most = bounds
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if not whole or not least <= value <= most:
        raise ConfigError(f"{where}: {name} must be a whole number from {least} to {most}, "
                          f"found {_kind(value)}.")
    return int(value)


def _check_sizes(config: dict[str, Any], sizes: dict[str, tuple[int, int]], where: str,
                 prefix: str, required: tuple[str, ...] = ()) -> None:
    """Each size present must be in bounds; ``required`` ones may not be null either."""
    for name, bounds in sizes.items():
        value = config.get(name)
        if value is not None or (name in required and name in config):
            _whole(value, prefix + name, bounds, where)


def _check_types(config: dict[str, Any], where: str, prefix: str) -> None:
    """The fields besides sizes that the estimator reads."""
    architectures = config.get("architectures")
    if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{where}: {prefix}architectures must be a list of names, "
                          f"found {_kind(architectures)}.")
    for name in ("model_type", "torch_dtype", "dtype"):
        value = config.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {prefix}{name} must be a string, found {_kind(value)}.")
    layers = config.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and len(layers) <= 4096 and all(
            isinstance(n, int) and not isinstance(n, bool) for n in layers)):
        raise ConfigError(f"{where}: {prefix}mlp_only_layers must be a list of layer numbers.")
    factor = config.get("partial_rotary_factor")
    if factor is not None and not (isinstance(factor, int | float) and not isinstance(factor, bool)
                                   and 0 < factor <= 1):
        raise ConfigError(f"{where}: {prefix}partial_rotary_factor must be a number in (0, 1], "
                          f"found {_kind(factor)}.")


def _check_heads(config: dict[str, Any], where: str) -> None:
    """Attention heads must each get some of the hidden size."""
    hidden = next((config[n] for n in ("hidden_size", "n_embd", "d_model") if config.get(n)), None)
    heads = next((config[n] for n in ("num_attention_heads", "n_head") if config.get(n)), None)
    if hidden and heads and config.get("head_dim") is None and hidden < heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is smaller than num_attention_heads "
                          f"{heads}, so a head has no width (and head_dim is not given).")


def _check_vision(vision: Any, where: str, prefix: str) -> None:
    if vision is None:
        return
    if not isinstance(vision, dict):
        raise ConfigError(f"{where}: {prefix}vision_config must be an object, found {_kind(vision)}.")
    _check_sizes(vision, _VISION_SIZES, where, prefix + "vision_config.")


def _check_quantization(qc: Any, where: str, prefix: str) -> None:
    name = prefix + "quantization_config"
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise ConfigError(f"{where}: {name} must be an object, found {_kind(qc)}.")
    _check_sizes(qc, _QUANT_SIZES, where, name + ".",
                 required=("bits", "w_bit", "group_size", "q_group_size"))
    groups = qc.get("config_groups")
    if groups is None:
        return
    if not isinstance(groups, dict) or not all(isinstance(g, dict) or g is None for g in groups.values()):
        raise ConfigError(f"{where}: {name}.config_groups must be an object of objects.")
    for key, group in groups.items():
        weights = (group or {}).get("weights")
        if weights is not None and not isinstance(weights, dict):
            raise ConfigError(f"{where}: {name}.config_groups.{key}.weights must be an object.")
        _check_sizes(weights or {}, _QUANT_SIZES, where, f"{name}.config_groups.{key}.weights.",
                     required=("num_bits",))


def load_model(model_id: str, *, revision: str | None = None, metadata: bool = True) -> ModelInfo:
    """Everything the estimator needs about ``model_id`` (see the module docstring)."""
    size = parse_size(model_id)
    if size is not None:
        return ModelInfo(model_id=model_id, source="size", parameter_count=size,
                         notes=("only the parameter count is known: KV cache and activation "
                                "figures are guesses for a typical decoder of this size",))
    local = resolve_model_dir(model_id)
    if model_id in _BUILTIN and local is not None and not (local / "config.json").exists():
        return ModelInfo(model_id=model_id, source="builtin", config=dict(_BUILTIN[model_id][1]))
    if local is not None:
        if not local.is_dir():
            raise ConfigError(f"model directory {local} does not exist.",
                              hint="model.id is a local path here; check it or use a hub id (org/name).")
        return ModelInfo(model_id=model_id, source=f"local dir {local}",
                         config=read_config_file(local / "config.json"))
    if not re.match(r"^[\w.-]+/[\w.-]+$", model_id):
        raise ConfigError(
            f"model '{model_id}' is neither a local directory, a Hugging Face repo id "
            "(org/name) nor a size such as 7B.")
    config = _hub_config(model_id, revision)
    params = _hub_safetensors_params(model_id, revision) if metadata else None
    return ModelInfo(model_id=model_id, source="hub", config=config, safetensors_params=params)


def _hub_cache() -> Path:
    return get_settings().cache_dir / "hf"


def _hub_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    """Download (or reuse the cached) config.json of a hub repo."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=_hub_cache())
    except GatedRepoError:
        raise ConfigError(f"Hugging Face repo '{repo_id}' is gated and this token may not read it.",
                          hint="Accept the model's licence on the hub and set HF_TOKEN.") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"Hugging Face repo '{repo_id}' does not exist (or is private).",
                          hint="Check model.id; for a private repo set HF_TOKEN.") from None
    except RevisionNotFoundError:
        raise ConfigError(f"revision '{revision}' of '{repo_id}' does not exist.") from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise TransientError(
            f"cannot reach the Hugging Face hub for '{repo_id}' and its config.json is not cached.",
            hint="Retry when the network is back, or point model.id at a local directory.") from None
    except EntryNotFoundError:
        raise ConfigError(f"Hugging Face repo '{repo_id}' has no config.json.") from None
    except HfHubHTTPError as exc:
        raise TransientError(f"the Hugging Face hub failed for '{repo_id}': {exc}.") from None
    except Exception as exc:  # noqa: BLE001 - connection errors (httpx, OSError) and the like
        raise TransientError(
            f"cannot download config.json of '{repo_id}': {type(exc).__name__}: {exc}.") from None
    return read_config_file(Path(path))


def _hub_safetensors_params(repo_id: str, revision: str | None) -> dict[str, int] | None:
    """Parameter counts per dtype from the checkpoint's safetensors headers, or None.

    Optional: a failure here only means the estimate falls back to the architecture."""
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo_id, revision=revision, timeout=10)
        counts = {str(k): int(v) for k, v in meta.parameter_count.items()}
        return counts or None
    except Exception:  # noqa: BLE001 - the architecture count is a good fallback
        return None
