"""Eraser and LoRA files on ComfyUI models: key maps (ComfyUI's LoRA loader, diffusers names), weight
differences from full erased files, and Receler's attention-output hook."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import comfy.lora
import comfy.utils
import torch

from ...erasure_core import (
    PatchError,
    Progress,
)
from ...erasure_core.edit.adapters import Adapter
from ...erasure_core.edit.extract import KeyPart, WeightDiff, fused_pairs, weight_differences
from ...erasure_core.errors import KEY_CHARS, ErasureError, shown
from ...erasure_core.formats.eraser_files import EraserFile
from ...erasure_core.formats.eraser_formats import Naming, is_dit_diffusers_key, strip_text_encoder_prefix
from .runtime import UNET_PREFIX, model_family_of
from .weights import _arriving_loader, _base_loader, _store_dtype

logger = logging.getLogger(__name__)




def _diffusers_unet_map(model: Any) -> dict[str, str]:
    """diffusers UNet key -> ComfyUI key, from ComfyUI's own ``unet_to_diffusers``."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not config:
        return {}
    return {k: UNET_PREFIX + v for k, v in comfy.utils.unet_to_diffusers(config).items()}



def unet_key_pairs(model: Any, keys: Sequence[str], naming: Naming, *,
                   input_name: str = "eraser") -> list[tuple[str, str]]:
    """``(file_key, model_key)`` for the UNet keys of a weights file picked in the node input
    ``input_name``; an unknown key raises, naming the first one."""
    model_keys = set(model.model_state_dict(filter_prefix=UNET_PREFIX))
    diffusers = _diffusers_unet_map(model) if naming == Naming.DIFFUSERS else {}
    pairs, unknown = [], []
    for key in keys:
        if naming == Naming.DIFFUSERS:
            target = diffusers.get(key.removeprefix("unet."))
        else:
            bare = key.removeprefix("model.").removeprefix(UNET_PREFIX)
            target = UNET_PREFIX + bare
        if target is None or target not in model_keys:
            unknown.append(key)
        else:
            pairs.append((key, target))
    if unknown:
        raise ErasureError(
            f"every UNet weight in the {input_name} must exist in the connected {model_family_of(model)} model, but "
            f"{len(unknown)} of {len(keys)} do not (first: '{unknown[0]}'). The {input_name} was made for another "
            "architecture; pick the one for this model.", input_name=input_name)
    return pairs

DIFF_FROM_BASE = "base weights"

DIFF_FROM_ARRIVING = "model as it arrives"



def unet_weight_differences(model: Any, file: EraserFile, pairs: Sequence[tuple[str, str]] | None, reference: str,
                            progress: Progress | None = None, for_patching: bool = True,
                            parts: dict[str, KeyPart] | None = None) -> WeightDiff:
    """The UNet weights of ``file`` that differ from the model's; as patch tensors (the model's
    dtype) or, for extraction (``for_patching=False``), in float32. ``parts`` instead of ``pairs``:
    file tensors that are slices of the model's fused weights, assembled per weight first. Errors
    blame the node input the file was picked in (``file.input_name``)."""
    input_name = file.input_name
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    read_base, dtype_of = _base_loader(model, UNET_PREFIX)
    read = _arriving_loader(model, UNET_PREFIX) if reference == DIFF_FROM_ARRIVING else read_base
    keep = (lambda key: _store_dtype(dtype_of(key))) if for_patching else None
    read_file = file.__getitem__
    if parts is not None:  # each fused weight is read to fill the rows the file lacks, then differenced: once
        read = _last_read(read)
        pairs, read_file = fused_pairs(parts, file.__getitem__, read, shapes, input_name=input_name)
    return weight_differences(pairs or [], read_file, read, shapes, model_dtype=dtype_of, delta_dtype=keep,
                              progress=progress, input_name=input_name)


def _last_read(read: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``read`` that keeps its last result: a key read twice in a row is read once (callers don't mutate it)."""
    last: dict[str, torch.Tensor] = {}

    def cached(key: str) -> torch.Tensor:
        if key not in last:
            last.clear()
            last[key] = read(key)
        return last[key]

    return cached


_UNET_FAMILIES = ("SD1", "SD2", "SDXL")


def dit_diffusers_parts(model: Any, keys: Sequence[str], *, input_name: str = "eraser") -> dict[str, KeyPart]:
    """Where each tensor of a full DiT file in diffusers names lands in this model, from ComfyUI's own
    map (Flux: ``comfy.utils.flux_to_diffusers``; ``attn.to_q``/``to_k``/``to_v`` are row blocks of the
    fused ``qkv``, ``norm_out.linear`` has scale and shift swapped). Other DiT families are refused by
    name; an unknown key raises, naming the first one."""
    family = model_family_of(model)
    if family != "Flux":
        raise ErasureError(
            f"a full transformer file in diffusers names is mapped onto Flux models only, but the connected model is "
            f"{family}. Save the erased model in ComfyUI's names (e.g. with ComfyUI's model save) and apply that.",
            input_name=input_name)
    config = getattr(model.model, "model_config", None)
    key_map = comfy.utils.flux_to_diffusers(getattr(config, "unet_config", {}), output_prefix=UNET_PREFIX)
    model_keys = set(model.model_state_dict(filter_prefix=UNET_PREFIX))
    parts, unknown = {}, []
    for key in keys:
        target = key_map.get(key.removeprefix("transformer."))
        if isinstance(target, str):
            part = KeyPart(target)
        elif target is not None:  # (ComfyUI key, (dim, offset, size) or None[, transform])
            where = target[1]
            part = KeyPart(target[0], *(where if where is not None else (None, 0, 0)),
                           transform=target[2] if len(target) > 2 else None)
        if target is None or part.target not in model_keys:
            unknown.append(key)
        else:
            parts[key] = part
    if unknown:
        raise ErasureError(
            f"every transformer weight in the {input_name} must exist in the connected {family} model, but "
            f"{len(unknown)} of {len(keys)} do not (first: '{unknown[0]}'). The {input_name} was made for another "
            "architecture or size; pick the one for this model.", input_name=input_name)
    return parts


def unet_file_differences(model: Any, file: EraserFile, keys: Sequence[str], naming: Naming | None, reference: str,
                          progress: Progress | None = None, for_patching: bool = True) -> WeightDiff:
    """:func:`unet_weight_differences` for the model weights of a full or partial erased file, whatever its
    naming: ComfyUI/LDM or diffusers names of a UNet, or a DiT's diffusers names (split q/k/v assembled).
    Errors blame the node input the file was picked in (``file.input_name``)."""
    if naming == Naming.DIFFUSERS and model_family_of(model) not in _UNET_FAMILIES and \
            all(is_dit_diffusers_key(k) for k in keys):
        return unet_weight_differences(model, file, None, reference, progress, for_patching,
                                       parts=dit_diffusers_parts(model, keys, input_name=file.input_name))
    return unet_weight_differences(model, file, unet_key_pairs(model, keys, naming, input_name=file.input_name),
                                   reference, progress, for_patching)



def text_encoder_pairs(clip: Any, file: EraserFile) -> list[tuple[str, str]]:
    """``(file_key, clip_key)`` for a CLIPTextModel state dict: ``text_model.*`` under ComfyUI's
    ``clip_l``/``clip_g``/``clip_h`` ``.transformer.``, chosen by shape."""
    clip_shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    by_suffix: dict[str, list[str]] = {}
    for key in clip_shapes:
        at = key.find("transformer.text_model.")
        if at >= 0:
            by_suffix.setdefault(key[at + len("transformer."):], []).append(key)
    pairs = []
    for key in file:
        stripped = strip_text_encoder_prefix(key)
        if stripped is None or stripped.endswith("position_ids"):
            continue
        candidates = [k for k in by_suffix.get(stripped, []) if clip_shapes[k] == file.shapes[key]]
        if not candidates:
            found = by_suffix.get(stripped, [])
            detail = (f"the CLIP's '{found[0]}' is {clip_shapes[found[0]]} but the file's is {file.shapes[key]}"
                      if found else "the connected CLIP has no such weight")
            raise ErasureError(
                f"a text-encoder eraser must fit the connected CLIP, but '{key}' does not: {detail}. Pick the "
                "eraser made for this model's text encoder.", input_name="eraser")
        pairs.append((key, candidates[0]))
    return pairs



def text_encoder_differences(clip: Any, file: EraserFile, pairs: Sequence[tuple[str, str]], reference: str) -> \
        tuple[WeightDiff, Callable[[str], torch.dtype]]:
    shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    read_base, dtype_of = _base_loader(clip.patcher, None)
    read = _arriving_loader(clip.patcher, None) if reference == DIFF_FROM_ARRIVING else read_base
    keep = lambda key: _store_dtype(dtype_of(key))  # noqa: E731
    return weight_differences(pairs, file.__getitem__, read, shapes, model_dtype=dtype_of, delta_dtype=keep), dtype_of



def _lora_key_map(model: Any, clip: Any | None) -> dict[str, Any]:
    """ComfyUI's LoRA key map, plus the plain ``unet.<diffusers name>`` aliases that PEFT-style
    SD1/SDXL LoRAs use (built from the same ``unet_to_diffusers`` map)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for diffusers_key, comfy_key in _diffusers_unet_map(model).items():
        if diffusers_key.endswith(".weight"):
            stem = diffusers_key[: -len(".weight")]
            for alias in (stem, "unet." + stem, "base_model.model." + stem, "unet.base_model.model." + stem):
                key_map.setdefault(alias, comfy_key)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map

_LORA_MODULE = re.compile(r"(\.lora_(down|up|mid)\.weight|\.lora_[AB](\.default)?\.weight|\.lora\.(down|up)\.weight|"
                          r"_lora\.(down|up)\.weight|\.lora_linear_layer\.(down|up)\.weight|\.lora_[AB]|\.alpha|"
                          r"\.dora_scale|\.diff|\.diff_b)$")



def lora_patches(model: Any, clip: Any | None, file: EraserFile) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(UNet patches, CLIP patches, LoRA modules with no place in this model) via ComfyUI's
    ``load_lora``; each patch is a ComfyUI LoRA adapter."""
    key_map = _lora_key_map(model, clip)
    tensors = file.load_all()
    modules = sorted({_LORA_MODULE.sub("", k) for k in tensors})
    unplaced = [m for m in modules if m not in key_map]
    loaded = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    if clip is not None:
        shapes |= {k: tuple(v.shape) for k, v in clip.patcher.model_state_dict().items()}
    for key, adapter in loaded.items():
        _check_lora_shape(file.name, _patch_key(key), adapter, shapes.get(_patch_key(key)) if isinstance(key, str)
                          else None)
    unet = {k: v for k, v in loaded.items() if _patch_key(k).startswith(UNET_PREFIX)}
    text = {k: v for k, v in loaded.items() if not _patch_key(k).startswith(UNET_PREFIX)}
    return unet, text, unplaced



def _check_lora_shape(file: str, key: str, adapter: Any, shape: tuple[int, ...] | None) -> None:
    """Refuse a LoRA whose ``up @ down`` cannot be added to the weight it names (ComfyUI would only
    log "SHAPE MISMATCH" and skip it), or whose alpha is not finite, naming key and shapes."""
    if isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] in ("diff", "set"):
        # ``.diff`` / ``.diff_b`` (Save Erasure, LyCORIS "full") and ``.set_weight``: the tensor is the
        # weight's own shape (ComfyUI skips a "diff" of another shape with a log line only)
        tensor = adapter[1][0] if isinstance(adapter[1], tuple) and adapter[1] else None
        if shape is not None and isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != tuple(shape):
            raise ErasureError(
                f"eraser file {shown(file)} must fit the connected model, but its {adapter[0]} weight for "
                f"{shown(key, KEY_CHARS)} has shape {tuple(tensor.shape)} while the model's weight is {tuple(shape)}. "
                "Pick the eraser made for this model.", input_name="eraser")
        return
    weights = getattr(adapter, "weights", None)
    if not isinstance(weights, tuple) or len(weights) < 3 or not isinstance(weights[0], torch.Tensor):
        return  # not a plain LoRA (LoHa, LoKr...): ComfyUI checks those itself
    up, down, alpha = weights[0], weights[1], weights[2]
    if alpha is not None and not math.isfinite(float(alpha)):
        raise ErasureError(f"eraser file {shown(file)} must have finite alphas, but the alpha of {shown(key, KEY_CHARS)} is "
                           f"{float(alpha)}.",
                           input_name="eraser")
    if shape is None or weights[5] is not None:
        return
    fits = up.ndim >= 2 and down.ndim >= 2 and up.shape[1] == down.shape[0] and up.shape[0] == shape[0] and \
        down[0].numel() == math.prod(shape[1:])
    if not fits:
        raise ErasureError(f"eraser file {shown(file)} must fit the connected model, but the LoRA of {shown(key, KEY_CHARS)} has up "
                           f"{tuple(up.shape)} and down {tuple(down.shape)}, which cannot make its {shape} weight. "
                           "Pick the LoRA made for this model.", input_name="eraser")


def _patch_key(key: Any) -> str:
    return key if isinstance(key, str) else key[0]



def add_lora_patches(owner: Any, patches: dict[str, Any], strength: float) -> Any:
    clone = owner.clone()
    added = clone.add_patches(patches, strength)
    if len(added) != len(patches):
        missing = sorted(set(map(_patch_key, patches)) - set(map(_patch_key, added)))
        raise PatchError(f"every LoRA weight must land on the model, but {len(missing)} did not (first: "
                         f"'{missing[0] if missing else '?'}').", input_name="eraser")
    return clone

_LDM_BLOCK = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")



def receler_blocks(model: Any, adapters: dict[str, Adapter]) -> dict[tuple[str, int], Adapter]:
    """Receler's diffusers block prefixes (``down_blocks.1.attentions.0``) as the ``("input", 4)``
    block ids ComfyUI's UNet passes to attention patches; widths are checked."""
    diffusers = _diffusers_unet_map(model)
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    blocks = {}
    for prefix, adapter in adapters.items():
        target = diffusers.get(f"{prefix}.transformer_blocks.0.attn2.to_out.0.weight")
        match = _LDM_BLOCK.match(target or "")
        if match is None:
            raise ErasureError(
                f"every Receler adapter must sit on a cross-attention block of the connected "
                f"{model_family_of(model)} model, but '{prefix}' has none. Pick the eraser made for this model.",
                input_name="eraser")
        width = shapes[target][0]
        if width != adapter.dim:
            raise ErasureError(
                f"Receler adapter '{prefix}' must match the block's width {width}, but it is {adapter.dim} "
                "wide. Pick the eraser made for this model.", input_name="eraser")
        kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[match.group(1)]
        blocks[(kind, 0 if kind == "middle" else int(match.group(2)))] = adapter
    return blocks



def add_attn2_output_patch(model: Any, patch: Callable[..., Any]) -> Any:
    clone = model.clone()
    clone.set_model_attn2_output_patch(patch)
    return clone



def unet_lora_key_map(model: Any) -> dict[str, str]:
    """kohya/diffusers LoRA names -> this model's UNet weight keys (ComfyUI's own LoRA mapping)."""
    return comfy.lora.model_lora_keys_unet(model.model, {})


LORA_NAMINGS = ("kohya", "diffusers")


def lora_module_names(model: Any, naming: str = "kohya") -> dict[str, str]:
    """This model's weight key -> the LoRA module name that ComfyUI's LoRA loader maps back onto that
    whole weight, for any family (the inverse of ``_lora_key_map``): ``kohya`` gives
    ``lora_unet_<ComfyUI key with _>``; ``diffusers`` the family's diffusers name (``transformer.*`` for
    DiTs, ``unet.*`` for SD1.x/SDXL) where ComfyUI knows one, else the kohya name. Names ComfyUI maps
    onto a slice of a fused weight (Flux's ``add_k_proj`` in ``txt_attn.qkv``) are not whole weights
    and are left out. Writers of LoRA files (Save Erasure) use this so every loader reads them."""
    if naming not in LORA_NAMINGS:
        raise ErasureError(f"naming must be one of {LORA_NAMINGS}, but got {naming!r}.", input_name="naming")
    by_key: dict[str, list[str]] = {}
    for name, target in _lora_key_map(model, None).items():
        if isinstance(target, str):
            by_key.setdefault(target, []).append(name)
    out = {}
    for key, names in by_key.items():
        kohya = [n for n in names if n.startswith("lora_unet_")]
        diffusers = [n for n in names if n.startswith(("transformer.", "unet."))]
        pick = (diffusers or kohya) if naming == "diffusers" else kohya
        if pick:
            out[key] = sorted(pick, key=len)[0]
    return out
