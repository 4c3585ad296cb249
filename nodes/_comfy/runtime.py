"""ComfyUI's runtime: the compute device, the progress bar (with Cancel) and a MODEL's family."""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management
import comfy.utils
import torch

from ...erasure_core import (
    Progress,
)
from ...erasure_core.formats.eraser_formats import model_family

logger = logging.getLogger(__name__)


UNET_PREFIX = "diffusion_model."



def compute_device() -> torch.device:
    """The device ComfyUI computes on (the user's GPU, or the CPU under --cpu)."""
    return comfy.model_management.get_torch_device()



def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."



def progress_bar() -> Progress:
    """A ``progress(done, total)`` callback that drives ComfyUI's bar and honours Cancel.

    Each phase (encoding, then the sites) reports against its own total.
    """
    bar = comfy.utils.ProgressBar(1)

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update



def model_family_of(model: Any) -> str:
    """``SD1``/``SD2``/``SDXL``/``SD3``/``Flux`` (or ComfyUI's config class name) of a MODEL."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return model_family(type(config).__name__) if config is not None else "unknown"



def _unet_prefix_keys(model: Any) -> list[str]:
    return [k for k in model.model_state_dict() if k.startswith(UNET_PREFIX)]
