"""SPM files (concept semi-permeable membranes): reading and checking them.

A released SPM (Lyu et al., CVPR 2024; ``research/algorithms.md`` §5.1) is a kohya-style LoRA
safetensors file: for every Linear/Conv2d inside every UNet transformer,
``lora_unet_<diffusers path with _>.lora_down.weight`` ``[r, in(, kh, kw)]``,
``....lora_up.weight`` ``[out, r(, 1, 1)]`` and ``....alpha`` (a scalar), rank ``r = 1``. The
header metadata holds ``prompts`` (the comma-joined erased concept texts), ``rank`` and
``alpha``. A module adds ``(alpha / r) * up @ down`` to its weight, times the membrane's
multiplier ``m``.

How several membranes combine into one edit is in ``gating/spm_combine.py``.

Pure torch + safetensors; never imports ComfyUI.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import KEY_CHARS, ArchitectureError, PatchError, shown
from ..numeric import all_finite

__all__ = [
    "SPMFile",
    "SPMModule",
    "load_spm_file",
    "load_spm_metadata",
    "parse_spm",
    "resolve_keys",
    "split_prompts",
]

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def split_prompts(text: str) -> tuple[str, ...]:
    """The concept texts of a ``prompts`` metadata value: split on commas as the reference does
    (``md["prompts"].split(",")``), surrounding spaces dropped (CLIP's tokenizer drops them
    too), empty items skipped."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class SPMModule:
    """One adapted weight: ``down`` ``[r, in, ...]``, ``up`` ``[out, r, ...]`` (float32), ``alpha``."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 without alpha or with alpha 0, as kohya and SPM's layer do)."""
        return 1.0 if not self.alpha else self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_numel(self) -> int:
        return int(self.down[0].numel())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, r], down [r, in*kh*kw])`` without the scale."""
        return self.up.flatten(1), self.down.flatten(1)


@dataclass(frozen=True)
class SPMFile:
    """A parsed SPM (or plain kohya LoRA) file.

    ``prompts``: the concept texts from the ``prompts`` metadata, empty for a plain LoRA (the
    caller must then supply the concept text); ``ignored``: text-encoder keys that were skipped.
    """

    name: str
    modules: dict[str, SPMModule]
    prompts: tuple[str, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    @property
    def is_spm(self) -> bool:
        return bool(self.prompts)

    @property
    def rank(self) -> int:
        """The metadata rank, else the largest module rank."""
        if "rank" in self.metadata:
            try:
                return int(float(self.metadata["rank"]))
            except ValueError:
                pass
        return max(m.rank for m in self.modules.values())

    @property
    def reference_scale(self) -> float:
        """The layer scale of the reference script: metadata ``alpha / rank`` (with the same
        fallbacks as its layer: alpha missing or 0 means no scaling), else the modules' own."""
        if "alpha" in self.metadata:
            try:
                alpha = float(self.metadata["alpha"])
            except ValueError:
                alpha = 0.0
            return 1.0 if alpha == 0 else alpha / self.rank
        return next(iter(self.modules.values())).scale


def _file_error(name: str, message: str, input_name: str | None) -> PatchError:
    return PatchError(f"'{name}' {message}", input_name=input_name)


def parse_spm(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, name: str,
              *, input_name: str | None = None) -> SPMFile:
    """Read an SPM from its tensors and header metadata.

    Accepts kohya UNet keys (``lora_unet_*.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``);
    text-encoder keys (``lora_te*``) are skipped and listed in ``ignored``; any other key (LoHa,
    LoKr, DoRA, mid weights...) is refused with the key named, as is a module missing its up or
    down weight or with mismatched ranks.
    """
    shapes = {k: tuple(int(n) for n in t.shape) for k, t in state_dict.items()}
    return _parse(shapes, state_dict.__getitem__, metadata, name, input_name)


def _layout(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], name: str,
            input_name: str | None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``({module: {"down"|"up"|"alpha": key}}, ignored text-encoder keys)`` from the key names and
    shapes alone (a safetensors header): every refusal that needs no tensor value, so a file that
    is not an SPM is refused before any of its tensors is read."""
    parts: dict[str, dict[str, str]] = {}
    ignored = []
    for key in shapes:
        if key.startswith(TEXT_ENCODER_PREFIXES):
            ignored.append(key)
            continue
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(UNET_PREFIX) or suffix is None:
            raise _file_error(name, f"must be a kohya-style LoRA/SPM file (keys 'lora_unet_*.lora_down.weight', "
                                    f"'.lora_up.weight', '.alpha'), but it has the key {shown(key, KEY_CHARS)}. Use an SPM file "
                                    "or a plain LoRA in that format.", input_name)
        parts.setdefault(key[: -len(suffix)], {})[_SUFFIXES[suffix]] = key
    if not parts:
        raise _file_error(name, "must hold UNet LoRA weights ('lora_unet_*'), but it has none. Pick an SPM file.",
                          input_name)
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            missing = "lora_up.weight" if "up" not in p else "lora_down.weight"
            raise _file_error(name, f"must have both factors of every module, but {shown(f'{module}.{missing}', KEY_CHARS)} is "
                                    "missing.", input_name)
        down, up = shapes[p["down"]], shapes[p["up"]]
        if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0] or (len(up) == 4 and up[2:] != (1, 1)):
            raise _file_error(name, f"must have matching LoRA factors, but {shown(module, KEY_CHARS)} has up {up} and down "
                                    f"{down}.", input_name)
        if min(down) == 0 or min(up) == 0:
            raise _file_error(name, f"must have LoRA factors of rank 1 or more, but {shown(module, KEY_CHARS)} has up {up} and "
                                    f"down {down} (rank 0).", input_name)
        if "alpha" in p and math.prod(shapes[p["alpha"]]) != 1:
            raise _file_error(name, f"must have one number per alpha, but {shown(module + '.alpha', KEY_CHARS)} has shape "
                                    f"{shapes[p['alpha']]}.", input_name)
    for field_name in ("alpha", "rank"):
        try:
            value = float(metadata.get(field_name, "0") or "0")
        except ValueError:
            continue  # the reference's own fallback: an unreadable alpha means no scaling
        if not math.isfinite(value):
            raise _file_error(name, f"must have a finite '{field_name}' in its metadata, but it is "
                                    f"{shown(metadata[field_name])}. The file is broken: re-download it.", input_name)
        if field_name == "rank" and field_name in metadata and value < 1:
            raise _file_error(name, f"must have rank 1 or more, but its metadata says rank {shown(metadata['rank'])}.",
                              input_name)
    return parts, ignored


def _parse(shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], torch.Tensor],
           metadata: Mapping[str, str] | None, name: str, input_name: str | None) -> SPMFile:
    """:func:`parse_spm` reading each UNet tensor with ``read`` only once the keys, shapes and
    metadata are checked (text-encoder tensors are never read)."""
    metadata = dict(metadata or {})
    parts, ignored = _layout(shapes, metadata, name, input_name)
    modules = {}
    for module, p in sorted(parts.items()):
        down, up = read(p["down"]).detach().to("cpu", torch.float32), read(p["up"]).detach().to("cpu", torch.float32)
        for part, tensor in (("lora_down.weight", down), ("lora_up.weight", up)):
            if not all_finite(tensor):
                raise _file_error(name, f"must hold finite weights, but {shown(f'{module}.{part}', KEY_CHARS)} "
                                        f"{tuple(tensor.shape)} has NaN or inf values. The file is broken: "
                                        "re-download it.", input_name)
        alpha = None
        if "alpha" in p:
            alpha = float(read(p["alpha"]).float().reshape(-1)[0])
            if not math.isfinite(alpha):
                raise _file_error(name, f"must have a finite alpha, but {shown(module + '.alpha', KEY_CHARS)} is {alpha}. The "
                                        "file is broken: re-download it.", input_name)
        modules[module] = SPMModule(module, down, up, alpha)
    prompts = split_prompts(metadata.get("prompts", ""))
    return SPMFile(name, modules, prompts, metadata, tuple(sorted(ignored)))


def load_spm_file(path: str, name: str | None = None, *, input_name: str | None = None) -> SPMFile:
    """Read an SPM ``.safetensors`` file (header metadata, then its UNet tensors). Other formats are
    refused: SPMs are released as safetensors, and pickles are never loaded. The keys, shapes and
    metadata are checked from the header first, so a file that is no SPM (a checkpoint picked in a
    slot that lists every LoRA) is refused without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    name = name or os.path.basename(path)
    if not path.lower().endswith((".safetensors", ".sft")):
        raise _file_error(name, "must be a .safetensors file (SPMs are released as safetensors; pickled "
                                "files are not loaded). Convert it or pick another file.", input_name)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(int(n) for n in f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return _parse(shapes, f.get_tensor, metadata, name, input_name)
    except (SafetensorError, OSError) as exc:
        raise _file_error(name, f"must be a readable safetensors file, but reading it failed ({exc}). "
                                "Re-download or re-save it.", input_name) from exc


def load_spm_metadata(path: str, name: str | None = None, *, input_name: str | None = None) -> dict[str, str]:
    """Only the header metadata of an SPM ``.safetensors`` file (cheap: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    name = name or os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise _file_error(name, f"must be a readable safetensors file, but reading it failed ({exc}). "
                                "Re-download or re-save it.", input_name) from exc


def resolve_keys(spm: SPMFile, key_map: Mapping[str, str], shapes: Mapping[str, Sequence[int]],
                 *, input_name: str | None = None) -> dict[str, str]:
    """``module name -> model weight key`` for every module of ``spm``.

    ``key_map`` maps kohya names (``lora_unet_...``) to the model's keys (ComfyUI's
    ``model_lora_keys_unet``); ``shapes`` the model's weight shapes. A module the model does not
    have, or whose shape differs, means the file was made for another architecture: refused,
    naming the first offending key.
    """
    out = {}
    for module_name, module in spm.modules.items():
        key = key_map.get(module_name)
        if key is None or key not in shapes:
            raise ArchitectureError(
                f"'{spm.name}' must be made for the connected model's architecture, but its key "
                f"{shown(module_name, KEY_CHARS)} matches no weight of the model ({len(spm.modules)} modules in the file). "
                "Released SPMs are for SD1.x: connect an SD1.x model, or pick an SPM trained for this one.",
                input_name=input_name)
        shape = tuple(shapes[key])
        if shape[0] != module.out_features or math.prod(shape[1:]) != module.in_numel:
            raise ArchitectureError(
                f"'{spm.name}' must be made for the connected model's architecture, but its key "
                f"{shown(module_name, KEY_CHARS)} has shape {module.out_features}x{module.in_numel} while the "
                f"model's {shown(key, KEY_CHARS)} is {'x'.join(map(str, shape))}. Pick an SPM trained for this model family.",
                input_name=input_name)
        out[module_name] = key
    return out
