"""Model weights and patches: K/V sites as a MODEL would use them, weight readers, and patched clones
(LoRA adapters, diffs) that never modify the input."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import comfy.lora
import comfy.model_management
import torch
from comfy.weight_adapter import LoRAAdapter

from ...erasure_core import (
    ArchitectureError,
    ArchSpec,
    AttentionSite,
    LazyWeight,
    PatchError,
    PatchSet,
    RowTransform,
    detect,
)
from .runtime import UNET_PREFIX, compute_device

logger = logging.getLogger(__name__)




def attention_sites(model: Any, device: torch.device | None = None) -> tuple[ArchSpec, list[AttentionSite]]:
    """The model's architecture and its K/V sites, weights *as this MODEL would use them*.

    Reads the unpatched base weight (the backup when a patched clone is loaded) and applies the
    patches already on this clone (LoRAs, earlier erasures), so edits compose in graph order.
    Weights are materialised one at a time when the method asks (``LazyWeight``), so the device
    never holds more than one fp32 copy. The input model is only read.
    """
    device = device or compute_device()
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    spec = detect(shapes)
    key_patches = model.get_key_patches(UNET_PREFIX)
    sites = []
    for key, text_input in spec.site_inputs(shapes):
        weight = LazyWeight(shapes[key], _effective_weight(key_patches[key], key, device))
        if text_input is None:
            sites.append(AttentionSite(key, weight))
            continue
        transform = None
        if text_input.norm is not None:  # the norm's scale as this clone uses it (LoRAs on it included)
            norm_key = spec.norm_key(shapes, text_input.norm)
            scale = _effective_weight(key_patches[norm_key], norm_key, device)()
            transform = RowTransform(norm_key, text_input.norm.eps, scale)
        sites.append(AttentionSite(key, weight, text_input.stream, transform))
    return spec, sites



def _effective_weight(key_patches: list[Any], key: str, device: torch.device) -> Callable[[], torch.Tensor]:
    """A loader of one weight in float32 on ``device``: base weight, then this clone's patches."""

    def load() -> torch.Tensor:
        (base, convert), *patches = key_patches
        weight = comfy.model_management.cast_to_device(base, device, torch.float32, copy=True)
        weight = convert(weight, inplace=True)
        return comfy.lora.calculate_weight(patches, weight, key) if patches else weight

    return load



def apply_patchset(model: Any, patch: PatchSet, strength: float) -> Any:
    """A clone of ``model`` with ``patch`` added at ``strength``; the input is not modified.

    Low-rank entries become ComfyUI LoRA adapters, dense ones ``diff`` patches. ComfyUI drops
    unknown keys silently, so any key it did not accept raises PatchError (before the clone is
    returned, so nothing downstream sees a half-applied edit).
    """
    patches: dict[str, Any] = {}
    for key, entry in patch.entries.items():
        if entry.is_low_rank:
            patches[key] = LoRAAdapter(set(), (entry.up, entry.down, None, None, None, None))
        else:
            patches[key] = ("diff", (entry.diff,))
    clone = model.clone()
    added = set(clone.add_patches(patches, strength))
    missing = sorted(set(patches) - added)
    if missing:
        raise PatchError(
            f"the patch must fit the connected model, but {len(missing)} of {len(patches)} keys "
            f"are not in it (first: '{missing[0]}'). Apply the patch to the architecture it was "
            "made for.",
            input_name="model",
        )
    logger.debug("applied %d patch keys at strength %s", len(added), strength)
    return clone



def _base_loader(model_patcher: Any, prefix: str | None) -> tuple[Callable[[str], torch.Tensor],
                                                                  Callable[[str], torch.dtype]]:
    """Readers of a patcher's weights without its patches (as loaded from the checkpoint)."""
    key_patches = model_patcher.get_key_patches(prefix) if prefix is not None else model_patcher.get_key_patches()

    def read(key: str) -> torch.Tensor:
        base, convert = key_patches[key][0]
        weight = comfy.model_management.cast_to_device(base, torch.device("cpu"), torch.float32, copy=True)
        return convert(weight, inplace=True)

    return read, lambda key: key_patches[key][0][0].dtype



def _arriving_loader(model_patcher: Any, prefix: str | None) -> Callable[[str], torch.Tensor]:
    """Readers of a patcher's weights with the patches already on it (the model as it arrives)."""
    key_patches = model_patcher.get_key_patches(prefix) if prefix is not None else model_patcher.get_key_patches()
    return lambda key: _effective_weight(key_patches[key], key, torch.device("cpu"))()



def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32



def add_diff_patches(patcher_owner: Any, deltas: dict[str, torch.Tensor], strength: float,
                     dtype_of: Callable[[str], torch.dtype]) -> Any:
    """A clone of a MODEL or CLIP with ``("diff", ΔW)`` patches at ``strength``; every key must land."""
    clone = patcher_owner.clone()
    patches = {k: ("diff", (d.to(_store_dtype(dtype_of(k))),)) for k, d in deltas.items()}
    added = set(clone.add_patches(patches, strength))
    missing = sorted(set(patches) - added)
    if missing:
        raise PatchError(f"every eraser weight must land on the model, but {len(missing)} did not (first: "
                         f"'{missing[0]}').", input_name="eraser")
    return clone



def unet_weight_reader(model: Any) -> tuple[Callable[[str], torch.Tensor], dict[str, tuple[int, ...]],
                                            Callable[[str], torch.dtype]]:
    """(base-weight reader, shapes, dtypes) of a MODEL's UNet (Extract Eraser's original and erased)."""
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    read, dtype_of = _base_loader(model, UNET_PREFIX)
    return read, shapes, dtype_of



def unet_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}



def apply_lora_factors(model: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       strength: float = 1.0) -> Any:
    """A clone of ``model`` with ``up @ down`` added to each key (LoRA adapters; scale folded into
    ``up``). Any key ComfyUI did not accept raises PatchError before the clone is returned."""
    patches = {key: LoRAAdapter(set(), (up, down, None, None, None, None)) for key, (up, down) in factors.items()}
    clone = model.clone()
    added = set(clone.add_patches(patches, strength)) if patches else set()
    missing = sorted(set(patches) - added)
    if missing:
        raise PatchError(
            f"the SPM must fit the connected model, but {len(missing)} of {len(patches)} keys are not in it "
            f"(first: '{missing[0]}'). Connect the model the SPM was made for.", input_name="model")
    return clone



def kv_sites_pair(erased: Any, original: Any) -> tuple[ArchSpec, list[AttentionSite], list[AttentionSite]]:
    """The K/V sites of the erased and of the original MODEL (each as it arrives), checked to be
    one architecture."""
    spec_e, sites_e = attention_sites(erased)
    spec_o, sites_o = attention_sites(original)
    if spec_e.name != spec_o.name:

        raise ArchitectureError(
            f"the original model must be the same architecture as the erased one, but got "
            f"{spec_o.display_name} and {spec_e.display_name}. Connect the model the erasure was made from.",
            input_name="original_model")
    return spec_e, sites_e, sites_o
