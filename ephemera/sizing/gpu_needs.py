"""What a job asks of a GPU beyond memory: the CUDA compute capability its precision,
quantization and vLLM's kernels need (bf16, fp8, Marlin, AWQ/GPTQ). Used by the plan.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from ephemera.errors import ConfigError
from ephemera.lifecycle.server import vllm_options
from ephemera.provider import Offer
from ephemera.sizing.catalog import offer_capability
from ephemera.sizing.model_shape import Shape
from ephemera.spec.job import Job


def arg_text(args: list[str], flag: str) -> str | None:
    """The value of the last ``--flag X`` or ``--flag=X`` among vLLM arguments (the one
    vLLM's parser keeps)."""
    words = [w for a in args for w in (shlex.split(a) if " " in a else [a])]
    found = None
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            found = words[i + 1]
        elif word.startswith(flag + "="):
            found = word.split("=", 1)[1]
    return found


def arg_value(args: list[str], flag: str) -> int | None:
    """The integer value of ``--flag N`` or ``--flag=N`` among the job's extra vLLM args."""
    raw = arg_text(args, flag)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"server.args: {flag} takes a whole number, found '{raw}'.") from None


# ----------------------------------------------------------------------------- GPU capability
#
# What vLLM (0.10, the release the example jobs pin) asks of a GPU's CUDA compute
# capability, from its source and documentation:
# - Its attention backends need 7.5 (Turing) or newer; Volta (V100, 7.0) fails at start-up
#   (vllm-project/vllm#13398, #18571). AWS's Deep Learning Base AMI, the aws provider's
#   default, does not support P3 (V100) instances either.
# - ``--dtype bfloat16`` needs 8.0: below it the CUDA platform's dtype check stops vLLM
#   ("Bfloat16 is only supported on GPUs with compute capability of at least 8.0").
#   With ``--dtype auto`` (ephemera passes no --dtype for int4/int8/fp8 precision) a
#   bf16 checkpoint falls back to float16 there, which runs.
# - Each quantization method has a minimum (its config's get_min_capability): awq 7.5,
#   gptq 6.0, awq_marlin and gptq_marlin 8.0, bitsandbytes 7.0, fp8 and fbgemm_fp8 8.0,
#   modelopt FP8 8.9; compressed-tensors W8A8 int8 7.5, its 4-bit and FP8 schemes 8.0.
# - FP8 compute (W8A8) needs 8.9 (L4, L40S, H100, H200). On 8.0 to 8.6 (A100, A10G)
#   Fp8LinearMethod switches to the FP8 Marlin kernel (``use_marlin`` when the device
#   lacks capability 89): the weights stay 8-bit in GPU memory and are dequantised to
#   16-bit inside each matmul, activations stay 16-bit (W8A16). vLLM's FP8 page: "FP8
#   computation is supported on NVIDIA GPUs with compute capability > 8.9 ... FP8 models
#   will run on compute capability > 8.0 (Ampere) as weight-only W8A16, utilizing FP8
#   Marlin." The memory plan holds, so such offers are kept, with a note: the job runs,
#   but slower on compute-bound loads than on a GPU with FP8 compute. Later vLLM
#   releases lowered fp8's minimum to 7.5; ephemera keeps 8.0, the pinned release's.

VLLM_MIN_CAPABILITY = 7.5
BF16_MIN_CAPABILITY = 8.0
FP8_COMPUTE_CAPABILITY = 8.9
METHOD_MIN_CAPABILITY = {
    "awq": 7.5, "gptq": 6.0, "awq_marlin": 8.0, "gptq_marlin": 8.0, "marlin": 8.0,
    "bitsandbytes": 7.0, "fp8": 8.0, "fbgemm_fp8": 8.0, "experts_int8": 8.0,
}
FP8_METHODS = ("fp8", "fbgemm_fp8")


@dataclass(frozen=True)
class GpuNeeds:
    """What the job's vLLM command asks of a GPU: its ``--dtype``, the quantization
    method vLLM runs, that method's minimum compute capability, and whether the weights
    are FP8 (W8A8 from 8.9, weight-only below)."""

    dtype: str = "auto"
    method: str | None = None
    min_capability: float = 0.0
    fp8_weights: bool = False

    def check(self, offer: Offer) -> tuple[str | None, str | None]:
        """(why vLLM cannot run the job on the offer's GPU, or None; a note, or None)."""
        if offer.cpu_only:
            return None, None
        cap = offer_capability(offer)
        if cap is None:
            wanted = [w for w in ("bf16" if self.dtype == "bfloat16" else "",
                                  self.method if self.min_capability else "") if w]
            if wanted:
                return None, (f"the compute capability of {offer.gpu} is unknown: whether vLLM "
                              f"runs {' with '.join(wanted)} on it was not checked")
            return None, None
        gpu = f"{offer.gpu} (compute capability {cap:.1f})"
        if cap < VLLM_MIN_CAPABILITY:
            ami = (", nor by AWS's default Deep Learning AMI (no P3 support)"
                   if offer.provider == "aws" else "")
            return (f"{gpu} is not supported by the vLLM images{ami}: vLLM needs compute "
                    f"capability {VLLM_MIN_CAPABILITY:.1f} or newer."), None
        if self.dtype == "bfloat16" and cap < BF16_MIN_CAPABILITY:
            return (f"bf16 needs compute capability {BF16_MIN_CAPABILITY:.1f} or newer; vLLM "
                    f"refuses --dtype bfloat16 on {gpu}; precision fp16 runs there."), None
        if cap < self.min_capability:
            extra = (" (FP8 weights run weight-only through FP8 Marlin from 8.0, "
                     f"with FP8 compute from {FP8_COMPUTE_CAPABILITY:.1f})" if self.fp8_weights else "")
            return (f"{self.method} quantization needs compute capability "
                    f"{self.min_capability:.1f} or newer in vLLM{extra}; this is {gpu}."), None
        if self.fp8_weights and cap < FP8_COMPUTE_CAPABILITY:
            return None, (f"{gpu} has no FP8 compute: vLLM runs the FP8 weights weight-only "
                          "(W8A16) through its FP8 Marlin kernel; weight memory is the same, "
                          "compute-bound work is slower than W8A8 (compute capability "
                          f"{FP8_COMPUTE_CAPABILITY:.1f}+)")
        return None, None


def _quant_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    qc = (config or {}).get("quantization_config")
    if qc is None and config and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc if isinstance(qc, dict) else None


def _compressed_tensors_needs(qc: dict[str, Any]) -> tuple[float, bool]:
    """(minimum compute capability, FP8 weights) of a compressed-tensors checkpoint."""
    for group in (qc.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        bits = weights.get("num_bits", 8)
        if weights.get("type") == "float" and bits == 8:
            return 8.0, True
        if bits == 8 and (group or {}).get("input_activations"):
            return 7.5, False   # W8A8 int8
        return 8.0, False       # weight-only int4/int8 (Marlin)
    return 0.0, False


def gpu_needs(job: Job, shape: Shape, config: dict[str, Any] | None = None) -> GpuNeeds:
    """What the job's vLLM command line asks of a GPU. ``config`` is the model's
    config.json; without it the checkpoint's method is read off the shape."""
    argv = vllm_options(job, tensor_parallel_size=1, host="127.0.0.1", port=8000, served_name="m")
    dtype = (arg_text(argv, "--dtype") or "auto").lower()
    method = arg_text(argv, "--quantization")
    qc = _quant_config(config)
    if method is None and qc is not None:
        method = str(qc.get("quant_method") or "") or None
    elif method is None and config is None and shape.scheme.from_checkpoint:
        method = shape.scheme.name.split()[0]
    if method is None:
        return GpuNeeds(dtype=dtype)
    method = method.lower()
    if method in ("compressed-tensors", "compressed_tensors"):
        minimum, fp8 = _compressed_tensors_needs(qc or {})
        return GpuNeeds(dtype, method, minimum, fp8)
    if method == "modelopt":
        algo = str((qc or {}).get("quant_algo") or shape.scheme.name.split()[-1]).upper()
        return GpuNeeds(dtype, f"modelopt {algo}", FP8_COMPUTE_CAPABILITY if "FP8" in algo else 0.0)
    return GpuNeeds(dtype, method, METHOD_MIN_CAPABILITY.get(method, 0.0), method in FP8_METHODS)
