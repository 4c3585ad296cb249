"""Sampling helper shared by the real-ComfyUI tests: a few Euler steps of a tiny latent."""

from __future__ import annotations

import torch


def sample(model, clip, prompt, seed=7, steps=3, cfg=1.0):
    """Latent after ``steps`` Euler steps from seeded noise, positive ``prompt``, negative ''."""
    import comfy.sample

    def cond(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond(prompt), cond(""),
                                   latent, seed=seed, disable_pbar=True).float()


def live_weight(model, key):
    """The weight ``key`` as ``model`` (a ModelPatcher) runs it: loaded with its patches, float32 copy."""
    import comfy.model_management
    import comfy.utils

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return comfy.utils.get_attr(model.model, key).detach().float().clone()
