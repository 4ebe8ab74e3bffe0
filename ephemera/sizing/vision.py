"""Vision towers of vision-language models, and the memory vLLM's multimodal profiling
takes: pure functions, no I/O.

A vision-language checkpoint is a text decoder (``text_config``) plus a vision tower
(``vision_config``) and a projector/merger into the decoder's hidden size. vLLM loads
all of it and, at start-up, profiles the encoder with dummy images of the largest size
the processor allows. This module counts the tower's parameters per family and sizes
that profiling run:

- ``qwen2_vl``: ViT blocks (LayerNorm, fused qkv with bias, fc1/fc2 of ``mlp_ratio``),
  a Conv3d patch embedding without bias and a 2x2 patch merger;
- ``qwen2_5_vl``: the same with RMSNorm and a gated MLP with biases;
- ``qwen3_vl`` / ``qwen3_vl_moe``: LayerNorm blocks with fc1/fc2, a Conv3d patch
  embedding with bias, learned position embeddings, a merger and one "deepstack"
  merger per entry of ``deepstack_visual_indexes``;
- ``gemma3`` (SigLIP, 896 px) and ``idefics3`` / ``smolvlm`` (SigLIP + pixel shuffle);
- ``mistral3`` / ``pixtral`` (Pixtral: RMSNorm, gated MLP, no biases, patch merger);
- ``llava`` / ``llava_next`` (CLIP; vLLM drops the layers after the feature layer);
- ``internvl`` / ``internvl_chat`` (InternViT + pixel-shuffle MLP projector).

An unknown family with a ``vision_config`` is approximated as plain ViT blocks, and
the estimate says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Largest image the processors allow by default (pixels), when nothing bounds it.
QWEN2_MAX_PIXELS = 12_845_056        # 16384 x 28 x 28 (Qwen2-VL / Qwen2.5-VL processors)
QWEN3_MAX_PIXELS = 16_777_216        # "longest_edge" of the Qwen3-VL processor
PIXTRAL_IMAGE_SIZE = 1540
# Bytes of activations per patch and per (4 x hidden + 2 x MLP width) of the tower, in
# the dummy encoder pass: the input, q/k/v, attention output and MLP buffers live at
# once; twice the bare width covers the residual stream and the kernel's workspace.
VISION_ACTIVATION_FACTOR = 2


@dataclass(frozen=True)
class VisionTower:
    family: str
    parameters: int
    linear: int                 # parameters in linear layers (quantisable)
    hidden: int                 # width of the tower
    intermediate: int           # MLP width of the tower
    out_hidden: int             # width of what it hands the decoder
    outputs_per_token: int      # 1, or 1 + deepstack levels (Qwen3-VL)
    patches_per_image: int      # at the largest image
    tokens_per_image: int       # decoder tokens of the largest image
    modelled: bool = True


def _vit_block(h: int, i: int, *, gated: bool = False, bias: bool = True, norm: int = 2) -> tuple[int, int]:
    """(parameters, of which linear) of one pre-norm transformer block of width h."""
    b = 1 if bias else 0
    attn = 4 * h * h + 4 * h * b
    mlp = (3 * h * i + (2 * i + h) * b) if gated else (2 * h * i + (i + h) * b)
    linear = 4 * h * h + (3 if gated else 2) * h * i
    return attn + mlp + 2 * norm * h, linear


def _sizes(vc: dict[str, Any], hidden: str = "hidden_size") -> tuple[int, int, int]:
    h = int(vc.get(hidden) or vc.get("embed_dim") or vc.get("hidden_size") or 0)
    i = int(vc.get("intermediate_size") or 4 * h)
    n = int(vc.get("num_hidden_layers") or vc.get("depth") or 0)
    return h, i, n


def _pixels(kwargs: dict[str, Any], default: int) -> int:
    """max_pixels from mm_processor_kwargs (``max_pixels`` or ``size.longest_edge``)."""
    value = kwargs.get("max_pixels")
    size = kwargs.get("size")
    if value is None and isinstance(size, dict):
        value = size.get("longest_edge")
    return int(value) if isinstance(value, int | float) and value > 0 else default


def vision_tower(config: dict[str, Any], text_hidden: int,
                 mm_processor_kwargs: dict[str, Any] | None = None) -> VisionTower | None:
    """The vision tower of a multimodal config, or None for a text-only model."""
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        return None
    mtype = str(config.get("model_type", "")).lower()
    kwargs = mm_processor_kwargs or {}
    counter = _FAMILIES.get(mtype)
    if counter is None:
        return _plain_vit(mtype, vc, text_hidden)
    return counter(config, vc, text_hidden, kwargs)


def _qwen_dynamic(patch: int, merge: int, pixels: int) -> tuple[int, int]:
    patches = max(pixels // (patch * patch), merge * merge)
    return patches, patches // (merge * merge)


def _qwen2_vl(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    e = int(vc.get("embed_dim") or 1280)
    ratio = float(vc.get("mlp_ratio") or 4)
    i = int(e * ratio)
    n = int(vc.get("depth") or 32)
    patch, temporal = int(vc.get("patch_size") or 14), int(vc.get("temporal_patch_size") or 2)
    merge = int(vc.get("spatial_merge_size") or 2)
    out = int(vc.get("hidden_size") or text_hidden)
    block, block_linear = _vit_block(e, i)
    m = e * merge * merge
    merger = 2 * e + m * m + m + m * out + out
    params = 3 * temporal * patch * patch * e + n * block + merger
    patches, tokens = _qwen_dynamic(patch, merge, _pixels(kwargs, QWEN2_MAX_PIXELS))
    return VisionTower("qwen2_vl", params, n * block_linear + m * m + m * out, e, i, out, 1,
                       patches, tokens)


def _qwen2_5_vl(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    e, i, n = _sizes(vc)
    patch, temporal = int(vc.get("patch_size") or 14), int(vc.get("temporal_patch_size") or 2)
    merge = int(vc.get("spatial_merge_size") or 2)
    out = int(vc.get("out_hidden_size") or text_hidden)
    block, block_linear = _vit_block(e, i, gated=True, norm=1)
    m = e * merge * merge
    merger = e + m * m + m + m * out + out
    params = 3 * temporal * patch * patch * e + n * block + merger
    patches, tokens = _qwen_dynamic(patch, merge, _pixels(kwargs, QWEN2_MAX_PIXELS))
    return VisionTower("qwen2_5_vl", params, n * block_linear + m * m + m * out, e, i, out, 1,
                       patches, tokens)


def _qwen3_vl(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    e, i, n = _sizes(vc)
    patch, temporal = int(vc.get("patch_size") or 16), int(vc.get("temporal_patch_size") or 2)
    merge = int(vc.get("spatial_merge_size") or 2)
    out = int(vc.get("out_hidden_size") or text_hidden)
    positions = int(vc.get("num_position_embeddings") or 2304)
    deepstack = len(vc.get("deepstack_visual_indexes") or [])
    block, block_linear = _vit_block(e, i)
    m = e * merge * merge
    merger = 2 * e + m * m + m + m * out + out            # LayerNorm over the tower width
    deep_merger = 2 * m + m * m + m + m * out + out       # LayerNorm after the shuffle
    params = (3 * temporal * patch * patch * e + e + positions * e + n * block
              + merger + deepstack * deep_merger)
    linear = n * block_linear + (1 + deepstack) * (m * m + m * out)
    patches, tokens = _qwen_dynamic(patch, merge, _pixels(kwargs, QWEN3_MAX_PIXELS))
    return VisionTower("qwen3_vl", params, linear, e, i, out, 1 + deepstack, patches, tokens)


def _siglip(vc: dict, *, head: bool = False) -> tuple[int, int, int, int, int]:
    """(parameters, linear, hidden, intermediate, patches) of a SigLIP/CLIP-style tower."""
    e, i, n = _sizes(vc)
    size, patch = int(vc.get("image_size") or 224), int(vc.get("patch_size") or 14)
    patches = (size // patch) ** 2
    block, block_linear = _vit_block(e, i)
    params = 3 * patch * patch * e + e + patches * e + n * block + 2 * e
    if head:
        params += e + 4 * e * e + 4 * e + 2 * e + 2 * e * i + i + e
    return params, n * block_linear, e, i, patches


def _gemma3(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    params, linear, e, i, patches = _siglip(vc)
    tokens = int(config.get("mm_tokens_per_image") or 256)
    params += e + e * text_hidden               # soft-embedding norm + input projection
    return VisionTower("gemma3", params, linear + e * text_hidden, e, i, text_hidden, 1,
                       patches, tokens)


def _idefics3(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    params, linear, e, i, patches = _siglip(vc)
    scale = int(config.get("scale_factor") or 2)
    projector = e * scale * scale * text_hidden
    tiles = 1 if kwargs.get("do_image_splitting") is False else 17   # 4x4 grid + global
    return VisionTower("idefics3", params + projector, linear + projector, e, i, text_hidden, 1,
                       patches * tiles, tiles * patches // (scale * scale))


def _pixtral(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    e, i, n = _sizes(vc)
    patch = int(vc.get("patch_size") or 14)
    size = int(vc.get("image_size") or PIXTRAL_IMAGE_SIZE)
    size = int(math.sqrt(_pixels(kwargs, size * size)))
    merge = int(config.get("spatial_merge_size") or 2)
    block, block_linear = _vit_block(e, i, gated=True, bias=False, norm=1)
    bias = text_hidden * 2 if config.get("multimodal_projector_bias") else 0
    projector = e + e * merge * merge * e + e * text_hidden + text_hidden * text_hidden + bias
    params = 3 * patch * patch * e + e + n * block + projector
    linear = n * block_linear + e * merge * merge * e + e * text_hidden + text_hidden * text_hidden
    patches = (size // patch) ** 2
    return VisionTower("pixtral", params, linear, e, i, text_hidden, 1, patches,
                       patches // (merge * merge))


def _llava(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    """CLIP: class token, positions, pre-norm, blocks up to the feature layer (vLLM
    loads no more), a two-layer projector with biases."""
    e, i, n = _sizes(vc)
    layer = config.get("vision_feature_layer", -2)
    kept = n + layer + 1 if isinstance(layer, int) and layer < 0 else n
    size, patch = int(vc.get("image_size") or 336), int(vc.get("patch_size") or 14)
    patches = (size // patch) ** 2
    block, block_linear = _vit_block(e, i)
    tower = 3 * patch * patch * e + e + (patches + 1) * e + 2 * e + kept * block
    projector = e * text_hidden + text_hidden * text_hidden
    newline = text_hidden if str(config.get("model_type")) == "llava_next" else 0
    return VisionTower("llava", tower + projector + 2 * text_hidden + newline,
                       kept * block_linear + projector, e, i, text_hidden, 1, patches + 1, patches)


def _internvl(config: dict, vc: dict, text_hidden: int, kwargs: dict) -> VisionTower:
    e, i, n = _sizes(vc)
    size, patch = int(vc.get("image_size") or 448), int(vc.get("patch_size") or 14)
    if isinstance(size, list):
        size = size[0]
    patches = (size // patch) ** 2
    qk_norm = 2 * e if vc.get("qk_normalization") or vc.get("use_qk_norm") else 0
    block, block_linear = _vit_block(e, i)
    block += 2 * e + qk_norm                    # layer scales
    downsample = float(config.get("downsample_ratio") or 0.5)
    m = int(e / (downsample * downsample))
    projector = 2 * m + m * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden
    params = 3 * patch * patch * e + e + e + (patches + 1) * e + n * block + projector
    tiles = int(config.get("max_dynamic_patch") or kwargs.get("max_dynamic_patch") or 12) + 1
    tokens = int(patches * downsample * downsample)
    return VisionTower("internvl", params, n * block_linear + m * text_hidden + text_hidden ** 2,
                       e, i, text_hidden, 1, tiles * patches, tiles * tokens)


def _plain_vit(mtype: str, vc: dict, text_hidden: int) -> VisionTower | None:
    h, i, n = _sizes(vc)
    if not (h and n):
        return None
    block, linear = _vit_block(h, i)
    size, patch = int(vc.get("image_size") or 448), int(vc.get("patch_size") or 14)
    patches = (size // patch) ** 2
    return VisionTower(mtype or "unknown", n * block, n * linear, h, i, text_hidden, 1, patches,
                       patches, modelled=False)


_FAMILIES = {
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": _qwen3_vl, "gemma3": _gemma3, "idefics3": _idefics3, "smolvlm": _idefics3,
    "mistral3": _pixtral, "pixtral": _pixtral, "llava": _llava, "llava_next": _llava,
    "internvl": _internvl, "internvl_chat": _internvl,
}


@dataclass(frozen=True)
class MultimodalProfile:
    items: int                  # dummy images in the profiling batch
    tokens_per_image: int
    patches_per_image: int
    encoder_cache_bytes: float  # encoder outputs held while the decoder is profiled
    encoder_peak_bytes: float   # the dummy vision forward pass


def multimodal_profile(tower: VisionTower, *, max_model_len: int, max_num_batched_tokens: int,
                       images_per_prompt: int, dtype_bytes: int) -> MultimodalProfile:
    """What vLLM's encoder profiling takes: a batch of the largest images that fills the
    encoder budget (max(max_num_batched_tokens, tokens of one image)), capped by the
    per-prompt image limit; an image cannot hold more tokens than ``max_model_len``."""
    tokens = max(1, min(tower.tokens_per_image, max_model_len))
    patches = max(1, tower.patches_per_image * tokens // max(tower.tokens_per_image, 1))
    budget = max(max_num_batched_tokens, tokens)
    items = max(1, min(budget // tokens, max(images_per_prompt, 1)))
    cache = items * tokens * tower.out_hidden * tower.outputs_per_token * dtype_bytes
    width = 4 * tower.hidden + 2 * tower.intermediate
    peak = items * patches * width * dtype_bytes * VISION_ACTIVATION_FACTOR
    return MultimodalProfile(items, tokens, patches, cache, peak)
