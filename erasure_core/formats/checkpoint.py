"""A single-file checkpoint (SD1.x, SD2.x, SDXL) as edit sites and a text encoder, for the CLI.

The file is read as eraser files are (``formats.eraser_files``): safetensors lazily, one tensor at
a time; ``.ckpt``/``.pt`` only through ``torch.load(weights_only=True)``, never as a full pickle.
UNet keys ``model.diffusion_model.X`` become ``diffusion_model.X``, the names ComfyUI gives the
same weights, so a PatchSet from a checkpoint file and one from a ComfyUI MODEL have the same keys
(and Save Erasure writes the same LoRA for both).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..architectures import ArchSpec, AttentionSite, LazyWeight, detect
from ..errors import ErasureError
from ..text.clip import BPETokenizer
from ..text.clip_weights import TEXT_ENCODERS, ConcatEncoder, load_text_encoder
from .eraser_files import PICKLE_EXTENSIONS, SAFE_EXTENSIONS, EraserFile, open_eraser

__all__ = ["CHECKPOINT_UNET_PREFIX", "Checkpoint", "open_checkpoint"]

CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
UNET_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class Checkpoint:
    """An open checkpoint: its tensors (read on demand), architecture and UNet key map."""

    file: EraserFile
    arch: ArchSpec
    unet_keys: dict[str, str]  # ComfyUI key ("diffusion_model.…") -> file key

    @property
    def name(self) -> str:
        return self.file.name

    def sites(self, device: torch.device | str | None = None) -> list[AttentionSite]:
        """The K/V edit sites, each weight read from the file (float32) only when a method asks."""
        shapes = {k: self.file.shapes[f] for k, f in self.unet_keys.items()}

        def loader(file_key: str):
            return lambda: self.file[file_key].to(device=device, dtype=torch.float32)

        return [AttentionSite(key, LazyWeight(tuple(shapes[key]), loader(self.unet_keys[key])))  # type: ignore[arg-type]
                for key in self.arch.site_keys(shapes)]

    def text_encoder(self, tokenizer: BPETokenizer, device: torch.device | str | None = None) -> ConcatEncoder:
        """The checkpoint's own text encoder(s), read as ComfyUI reads this architecture's."""
        layouts = TEXT_ENCODERS.get(self.arch.name)
        if layouts is None:
            raise ErasureError(f"reading the text encoder of {self.arch.display_name} checkpoints is not supported "
                               f"yet (supported: {', '.join(TEXT_ENCODERS)}).", input_name="checkpoint")
        keys = list(self.file.shapes)
        encoders = [load_text_encoder(keys, self.file.__getitem__, layout, tokenizer, name=f"'{self.name}'")
                    for layout in layouts]
        return ConcatEncoder([e.to(device) if device is not None else e for e in encoders])


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open ``path`` and recognise its architecture from the UNet's keys and shapes (no tensor read
    for safetensors). Errors name the checkpoint and say what to do."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ErasureError(f"CHECKPOINT must be an existing file, but '{path}' is not.", input_name="checkpoint")
    if not path.lower().endswith(SAFE_EXTENSIONS + PICKLE_EXTENSIONS):
        raise ErasureError(f"CHECKPOINT must end with one of {SAFE_EXTENSIONS + PICKLE_EXTENSIONS}, but got "
                           f"'{os.path.basename(path)}'.", input_name="checkpoint")
    file = open_eraser(path, input_name="checkpoint")  # errors, also on tensors read later, blame our input
    unet = {UNET_PREFIX + k[len(CHECKPOINT_UNET_PREFIX):]: k for k in file.shapes if k.startswith(CHECKPOINT_UNET_PREFIX)}
    if not unet:
        raise ErasureError(f"'{file.name}' must be a single-file checkpoint with UNet weights under "
                           f"'{CHECKPOINT_UNET_PREFIX}', but has none (diffusers folders and UNet-only files are "
                           "not read here).", input_name="checkpoint")
    arch = detect({k: file.shapes[f] for k, f in unet.items()})
    return Checkpoint(file, arch, unet)
