"""Small eraser files for the tiny SD1.5 checkpoint (tiny_sd15.py), in the published formats, for the
server test's models/erasers folder (example_workflows/apply_eraser.json picks them)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

LDM = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_{}.weight"
DIFFUSERS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_{}.weight"
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_{}"


def write_esd_x(path, state_dict: dict[str, torch.Tensor], seed: int = 0) -> None:
    """An ESD ``esd_sd.py``-style partial UNet (trained attn2 K/V only, diffusers names, fp32)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for proj in ("k", "v"):
        weight = state_dict[LDM.format(proj)].float()
        out[DIFFUSERS.format(proj)] = (weight + 0.02 * torch.randn(weight.shape, generator=g)).contiguous()
    save_file(out, str(path))


def write_kohya_lora(path, concept: str, rank: int = 2, seed: int = 1) -> None:
    """A kohya LoRA on the first cross-attention's K/V, recording its concept in the metadata."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for proj in ("k", "v"):
        out[f"{KOHYA.format(proj)}.lora_down.weight"] = torch.randn(rank, 768, generator=g) * 0.05
        out[f"{KOHYA.format(proj)}.lora_up.weight"] = torch.randn(320, rank, generator=g) * 0.05
        out[f"{KOHYA.format(proj)}.alpha"] = torch.tensor(float(rank))
    save_file(out, str(path), metadata={"concept_text": concept, "ss_network_dim": str(rank)})
