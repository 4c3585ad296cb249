"""A small checkpoint that ComfyUI detects as SD1.5, built at test time (research/comfyui.md §7.3).

The UNet is shrunk (two levels, one res block each: 7 cross-attention layers at widths 320 and
640); CLIP-L and the VAE must be full size because ComfyUI builds them from fixed configs.
Weights are seeded random: linear/conv weights ~ N(0, 1/fan_in), norm scales 1, biases 0 (with
zero norm scales the UNet ignores its context).
"""

from __future__ import annotations

import torch


def _fill(module: torch.nn.Module, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.state_dict().items():
        if name.endswith("position_ids"):
            out[name] = p
            continue
        if p.ndim >= 2:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=gen) / fan_in**0.5
            if "embedding" in name:
                t = torch.randn(p.shape, generator=gen) * 0.02
        elif name.endswith("weight") or name.endswith("scale"):
            t = torch.ones(p.shape)
        else:
            t = torch.zeros(p.shape)
        out[name] = t.to(dtype)
    return out


def build_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*``, ``cond_stage_model.transformer.*``, ``first_stage_model.*``."""
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip

    gen = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = openaimodel.UNetModel(
            image_size=32, in_channels=4, model_channels=320, out_channels=4,
            num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
            transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
            num_heads=8, use_spatial_transformer=True, context_dim=768, legacy=False,
            use_linear_in_transformer=False, operations=ops,
        )
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                    "attn_resolutions": [], "dropout": 0.0}
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.", clip),
                           ("first_stage_model.", vae)):
        for k, v in _fill(module, gen, dtype).items():
            sd[prefix + k] = v
    return sd
