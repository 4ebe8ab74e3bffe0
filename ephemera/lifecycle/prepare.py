"""The prepare stage: the image the provider will run (building the built-in CPU
environment or image when the job asks for it) and where the model comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from ephemera.builtins.cpu_env import ensure_cpu_env
from ephemera.builtins.cpu_image import ensure_cpu_image
from ephemera.builtins.tiny_model import ensure_tiny_model
from ephemera.errors import (
    ConfigError,
)
from ephemera.provider import (
    BuiltinImage,
    ImagePuller,
    Runs,
)
from ephemera.spec.job import BUILTIN_CPU_IMAGE, BUILTIN_MODELS

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run


def model_source(run: Run) -> tuple[Path | None, str]:
    """(local directory to upload or None, what vLLM loads when it is not uploaded)."""
    model_id = run.job.model.id
    if model_id in BUILTIN_MODELS:
        return ensure_tiny_model(run._log, name=BUILTIN_MODELS[model_id]), ""
    candidate = Path(model_id).expanduser()
    if not candidate.is_absolute():
        candidate = run.loaded.base_dir / candidate
    if candidate.is_dir():
        return candidate, ""
    return None, model_id


def prepare_environment(run: Run) -> str:
    """Resolve the image for the provider (building the built-in CPU one when asked).
    Returns the image to launch."""
    image = run.job.image
    builtin = image.split(":")[0] == BUILTIN_CPU_IMAGE
    if run.job.suite.image and run.caps.runs is not Runs.MACHINE:
        raise ConfigError(f"suite.image: a separate suite image runs beside the server on a machine's "
                          f"Docker (providers ssh, aws, slurm); the {run.provider_name} provider runs the "
                          f"suite in the job's image: drop suite.image or use suite.setup")
    if run.caps.runs is Runs.THIS_MACHINE:
        if builtin:
            python = Path(ensure_cpu_env(run._log))
            run.python = str(python)
            run.path_prefix = str(python.parent)
        elif image != "host":
            raise ConfigError(f"image: the local provider runs on this machine; use 'host' (vLLM installed "
                              f"here) or '{BUILTIN_CPU_IMAGE}' (the built-in CPU environment), not '{image}'")
        return image
    if builtin:
        if run.caps.builtin_image is BuiltinImage.LOCAL_ENGINE:
            image = ensure_cpu_image(run._log)
            run.python = "python3"
            return image
        # Another machine's Docker must have the image already (it is built, not pulled).
        image = image if ":" in image else f"{image}:latest"
        run._log(f"image {image} must already exist on the machine's Docker "
                  "(build it there with `ephemera image build-cpu`)")
        run.python = "python3"
    return image


def pull_before_launch(run: Run, image: str) -> str:
    """Providers that pull the image themselves do it before the launch, so a cancel
    during a pull (minutes for a vLLM image) is not held by a launch call in flight."""
    if not run.caps.pulls_before_launch:
        return image
    puller = cast(ImagePuller, run.provider)
    with run.phase("pull", image):
        return puller.pull_image(image, run.reporter.progress)
