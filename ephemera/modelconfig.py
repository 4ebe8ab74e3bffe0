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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError, TransientError

TINY_MODEL_ID = "ephemera/tiny-llama"

# The shape ephemera.tiny_model builds (a LlamaConfig), used before the files exist.
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


def parse_size(text: str) -> int | None:
    """``7B`` -> 7_000_000_000; None when the text is not a bare size."""
    match = _SIZE_RE.match(text)
    if not match:
        return None
    return int(round(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]))


def resolve_model_dir(model_id: str) -> Path | None:
    """The local directory for a model id: the tiny model's cache dir, an existing
    directory, or None for a hub id (or a bare size)."""
    if model_id == TINY_MODEL_ID:
        from ephemera.settings import get_settings

        return get_settings().cache_dir / "models" / "tiny-llama"
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if model_id.startswith(("/", "./", "../", "~")):
        return path  # meant as a path: the loader says it is missing
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one config.json, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"model config {path} does not exist.",
                          hint="A local model directory must hold the model's config.json.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read model config {path}: {exc.strerror or exc}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def load_model(model_id: str, *, revision: str | None = None, metadata: bool = True) -> ModelInfo:
    """Everything the estimator needs about ``model_id`` (see the module docstring)."""
    size = parse_size(model_id)
    if size is not None:
        return ModelInfo(model_id=model_id, source="size", parameter_count=size,
                         notes=("only the parameter count is known: KV cache and activation "
                                "figures are guesses for a typical decoder of this size",))
    local = resolve_model_dir(model_id)
    if model_id == TINY_MODEL_ID and local is not None and not (local / "config.json").exists():
        return ModelInfo(model_id=model_id, source="builtin", config=dict(TINY_MODEL_CONFIG))
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
    from ephemera.settings import get_settings

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
