"""An SPM file in the released format for the tiny SD1.5 checkpoint (research/algorithms.md §5.1).

Keys are kohya names of the diffusers module paths (``lora_unet_down_blocks_0_attentions_0_proj_in
.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) for every Linear/Conv2d inside every
transformer: proj_in, proj_out (1x1 convs in SD1.x), attn1/attn2 to_q/to_k/to_v/to_out.0,
ff.net.0.proj and ff.net.2; rank 1, alpha 1, fp16 (as released), metadata prompts/rank/alpha.
The diffusers names come from ComfyUI's own ``unet_to_diffusers`` for the checkpoint's config.
"""

from __future__ import annotations

import re

import torch

MODULES = re.compile(r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                     r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.weight$")
CKPT_PREFIX = "model.diffusion_model."


def spm_tensors(state_dict: dict[str, torch.Tensor], seed: int = 0, up_scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Released-layout SPM tensors for a checkpoint state dict (``model.diffusion_model.*``)."""
    import comfy.model_detection
    import comfy.utils

    config = comfy.model_detection.model_config_from_unet(state_dict, CKPT_PREFIX)
    diffusers = comfy.utils.unet_to_diffusers(config.unet_config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(k for k in diffusers if MODULES.search(k)):
        shape = tuple(state_dict[CKPT_PREFIX + diffusers[name]].shape)
        kohya = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        spatial = (1, 1) if len(shape) == 4 else ()
        fan_in = shape[1]
        out[f"{kohya}.lora_down.weight"] = (torch.randn(1, fan_in, *spatial, generator=gen) / fan_in**0.5).half()
        out[f"{kohya}.lora_up.weight"] = (torch.randn(shape[0], 1, *spatial, generator=gen) * up_scale).half()
        out[f"{kohya}.alpha"] = torch.tensor(1.0).half()
    return out


def write_spm(path, state_dict: dict[str, torch.Tensor], prompts: str | None = "snoopy", seed: int = 0,
              up_scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Write the file (metadata exactly ``prompts``, ``rank``, ``alpha``; no ``prompts`` for a plain LoRA)."""
    from safetensors.torch import save_file

    tensors = spm_tensors(state_dict, seed, up_scale)
    metadata = {"rank": "1", "alpha": "1.0"}
    if prompts is not None:
        metadata["prompts"] = prompts
    save_file(tensors, str(path), metadata)
    return tensors
