"""Model weights and patches: K/V sites as a MODEL would use them, weight readers, and patched clones
(LoRA adapters, diffs) that never modify the input."""

from __future__ import annotations

import collections
import logging
import math
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
from ...erasure_core.errors import KEY_CHARS, shown, shown_list
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
    key_patches = model.get_key_patches(UNET_PREFIX)  # walks the state dict once; shapes from its base weights
    shapes = {k: tuple(patches[0][0].shape) for k, patches in key_patches.items()}
    spec = detect(shapes)
    context = context_transform_of(model)  # a float32 attn2 context transform already on this clone
    # per-layer streams (HiDream's llama_layers) are resolved from what the module's forward reads, else
    # from the config ComfyUI built it from
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    config = collections.ChainMap(getattr(getattr(model.model, "diffusion_model", None), "__dict__", {}), unet_config)
    sites = []
    for key, text_input, stream in spec.site_streams(shapes, config):
        weight = LazyWeight(shapes[key], _effective_weight(key_patches[key], key, device, context), owned=True)
        if text_input is None:
            sites.append(AttentionSite(key, weight))
            continue
        transform = None
        if text_input.norm is not None:  # the norm's scale as this clone uses it (LoRAs on it included)
            norm_key = spec.norm_key(shapes, text_input.norm)
            scale = _effective_weight(key_patches[norm_key], norm_key, device)()
            transform = RowTransform(norm_key, text_input.norm.eps, scale)
        sites.append(AttentionSite(key, weight, stream, transform))
    return spec, sites



def _effective_weight(key_patches: list[Any], key: str, device: torch.device,
                      transform: ContextTransform | None = None) -> Callable[[], torch.Tensor]:
    """A loader of one weight in float32 on ``device``: base weight, then this clone's patches,
    then (for a cross-attention K/V weight) an earlier erasure's context transform ``W M``."""

    def load() -> torch.Tensor:
        (base, convert), *patches = key_patches
        weight = comfy.model_management.cast_to_device(base, device, torch.float32, copy=True)
        weight = convert(weight, inplace=True)
        weight = comfy.lora.calculate_weight(patches, weight, key) if patches else weight
        if transform is not None and _is_kv(key) and weight.shape[-1] in transform.mats:
            with torch.no_grad():
                weight = weight @ transform.matrix(weight.shape[-1], weight.device)
        return weight

    return load


def _is_kv(key: str) -> bool:
    return ".attn2.to_k." in key or ".attn2.to_v." in key


class ContextTransform:
    """An ``attn2_patch`` that maps the cross-attention context (and value) ``c -> M c`` in float32
    for each key width, ``M`` the product of the anchored erasures applied so far. ``to_k(M c)`` is
    exactly ``(W M) c``, the edited weight, whatever precision the weights are stored or computed
    in: nothing small is rounded into bf16 or fp8 weights. Immutable (ComfyUI deep-copies
    ``model_options`` on every clone)."""

    def __init__(self, mats: dict[int, torch.Tensor]):
        self.mats = mats  # width -> M [d, d] float32
        self._on: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> ContextTransform:
        return self

    def matrix(self, width: int, device: torch.device) -> torch.Tensor:
        """``M`` for ``width`` on ``device``: an ordinary tensor even when first asked for under
        inference mode, so a graph that needs gradients (the soft-prompt attack) can use it."""
        m = self._on.get((width, device))
        if m is None:
            with torch.inference_mode(False):
                m = self._on.setdefault((width, device), self.mats[width].to(device, copy=True))
        return m

    def _apply(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if not isinstance(x, torch.Tensor) or x.shape[-1] not in self.mats:
            return x
        return (x.float() @ self.matrix(x.shape[-1], x.device).T).to(x.dtype)

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict) -> tuple:
        return n, self._apply(context), self._apply(value)

    def then(self, mats: dict[int, torch.Tensor]) -> ContextTransform:
        """This transform's edit followed by ``mats`` in graph order: ``W M_old M_new``."""
        out = dict(self.mats)
        with torch.inference_mode(False):
            for width, m in mats.items():
                out[width] = out[width] @ m if width in out else m
        return ContextTransform(out)


def _attn2_patches(model: Any) -> list[Any]:
    options = getattr(model, "model_options", None)
    if not isinstance(options, dict):
        return []
    return options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])


def context_transform_of(model: Any) -> ContextTransform | None:
    """This pack's context transform on ``model``, if an earlier erasure put one there."""
    return next((p for p in _attn2_patches(model) if isinstance(p, ContextTransform)), None)


def _wants_context_transform(model: Any, patch: PatchSet, state: dict[str, torch.Tensor]) -> bool:
    """Apply ``patch`` as a context transform when it is one shared multiplier per width over every
    cross-attention K/V weight of a UNet (attn2 patches reach exactly those), and the weights are
    stored or computed below float32 (in float32 the weight patch is already exact and stacks
    with later LoRAs as weights do)."""
    if not patch.context_multipliers or not hasattr(model, "set_model_attn2_patch"):
        return False
    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if type(diffusion).__name__ != "UNetModel":
        return False
    kv = {k for k in state if k.startswith(UNET_PREFIX) and _is_kv(k)}
    if set(patch.entries) != kv or any(state[k].shape[-1] not in patch.context_multipliers for k in kv):
        return False
    inner = model.model
    compute = getattr(inner, "manual_cast_dtype", None) or inner.get_dtype()
    return compute != torch.float32 or any(state[k].dtype != torch.float32 for k in kv)


def _multiplier(p: torch.Tensor, q: torch.Tensor | None, strength: float) -> torch.Tensor:
    """``I + strength (M − I)`` [d, d] float32 from ``M − I = P Q`` (or ``P`` when ``Q`` is None)."""
    with torch.inference_mode(False):  # ordinary tensors: usable where gradients flow (soft prompt)
        step = (p.double() if q is None else p.double() @ q.double()) * strength
        return (torch.eye(step.shape[0], dtype=torch.float64) + step).float()



def _check_patch_shapes(state: dict[str, torch.Tensor], patch: PatchSet, input_name: str) -> dict[str, tuple[int, ...]]:
    """The model's shape (``state``: its state dict) of every key ``patch`` edits that the model has;
    PatchError (blaming ``input_name``) when an entry cannot make its weight: ComfyUI would only log
    "SHAPE MISMATCH ... WEIGHT NOT MERGED" and sample the model unedited."""
    shapes = {key: tuple(state[key].shape) for key in patch.entries if key in state}

    def fits(key: str) -> bool:
        rows, cols = patch.entries[key].shape
        shape = shapes[key]
        return len(shape) >= 2 and shape[0] == rows and math.prod(shape[1:]) == cols

    def described(key: str) -> str:
        rows, cols = patch.entries[key].shape
        return f"{shown(key, KEY_CHARS)} is {rows}x{cols} in the patch but {'x'.join(map(str, shapes[key]))} in the model"

    wrong = [key for key in shapes if not fits(key)]
    if wrong:
        raise PatchError(
            f"every patch entry must have the shape of the model weight it edits, but {len(wrong)} of "
            f"{len(patch)} do not: {shown_list(wrong, 3, show=described)}. Apply the patch to the model it was made "
            "for.", input_name=input_name)
    return shapes


def apply_patchset(model: Any, patch: PatchSet, strength: float, *, input_name: str = "model") -> Any:
    """A clone of ``model`` with ``patch`` added at ``strength``; the input is not modified.

    Low-rank entries become ComfyUI LoRA adapters, dense ones ``diff`` patches. Every entry's shape
    is checked against the model's weight before anything is cloned (ComfyUI skips a mismatched
    weight with a log line only), blaming ``input_name`` (Apply Eraser LoRA: "eraser"). ComfyUI
    drops unknown keys silently, so any key it did not accept raises PatchError (before the clone
    is returned, so nothing downstream sees a half-applied edit).
    """
    state = model.model_state_dict()  # one walk over the modules serves both checks
    shapes = _check_patch_shapes(state, patch, input_name)
    if _wants_context_transform(model, patch, state):
        mats = {w: _multiplier(p, q, strength) for w, (p, q) in patch.context_multipliers.items()}
        clone = model.clone()
        earlier = context_transform_of(clone)
        listed = _attn2_patches(clone)
        if earlier is not None:
            listed.remove(earlier)  # the clone's own list (model_options is deep-copied on clone)
        clone.set_model_attn2_patch(earlier.then(mats) if earlier is not None else ContextTransform(mats))
        logger.debug("applied %d patch keys as a float32 context transform at strength %s", len(patch), strength)
        return clone
    earlier = context_transform_of(model)
    inverse = {w: torch.linalg.inv(m.double()).float() for w, m in earlier.mats.items()} if earlier else {}
    patches: dict[str, Any] = {}
    for key, entry in patch.entries.items():
        # After a context transform the weight meets M c: W + ΔM⁻¹ then gives (W M + Δ) c exactly.
        undo = inverse.get(entry.shape[1]) if _is_kv(key) else None
        if entry.is_low_rank:
            down = entry.down if undo is None else entry.down @ undo
            patches[key] = LoRAAdapter(set(), (entry.up, down, None, None, None, None))
        else:
            diff = entry.diff if undo is None else entry.diff @ undo
            if key in shapes and tuple(diff.shape) != shapes[key]:  # a conv weight [out, in, 1, 1]
                diff = diff.reshape(shapes[key])
            patches[key] = ("diff", (diff,))
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
