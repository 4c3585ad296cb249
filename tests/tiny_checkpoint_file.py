"""A tiny SD1.5-shaped single-file checkpoint written with plain torch (no ComfyUI): the marker
key, the K/V weights of the tiny UNet of tests/integration/tiny_sd15.py (7 cross-attention layers,
widths 320 and 640, context 768) and a CLIP-L-width text encoder with HF names and fewer layers.
Enough for the CLI, which reads only these; ComfyUI itself needs the full tiny_sd15 file."""

from __future__ import annotations

import torch

TINY_BLOCKS = {"input_blocks.1.1": 320, "input_blocks.3.1": 640, "middle_block.1": 640, "output_blocks.0.1": 640,
               "output_blocks.1.1": 640, "output_blocks.2.1": 320, "output_blocks.3.1": 320}


def build(seed: int = 0, clip_layers: int = 2, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape, std=None):
        return (torch.randn(shape, generator=gen) * (std if std is not None else shape[-1] ** -0.5)).to(dtype)

    sd = {"model.diffusion_model.input_blocks.0.0.weight": normal(320, 4, 3, 3)}
    for block, width in TINY_BLOCKS.items():
        for proj in ("k", "v"):
            sd[f"model.diffusion_model.{block}.transformer_blocks.0.attn2.to_{proj}.weight"] = normal(width, 768)
    p, d = "cond_stage_model.transformer.text_model.", 768
    sd[p + "embeddings.token_embedding.weight"] = normal(49408, d, std=0.02)
    sd[p + "embeddings.position_embedding.weight"] = normal(77, d, std=0.01)
    for i in range(clip_layers):
        q = f"{p}encoder.layers.{i}."
        for name, (o, n) in {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                             "self_attn.out_proj": (d, d), "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d)}.items():
            sd[q + name + ".weight"], sd[q + name + ".bias"] = normal(o, n), torch.zeros(o, dtype=dtype)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[q + ln + ".weight"], sd[q + ln + ".bias"] = torch.ones(d, dtype=dtype), torch.zeros(d, dtype=dtype)
    sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"] = torch.ones(d, dtype=dtype), torch.zeros(d, dtype=dtype)
    return sd
