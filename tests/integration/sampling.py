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


def loaded_state(model):
    """``model``'s UNet weights as it runs them (float copies). Clones share one module, whose weights
    are those of the clone ComfyUI loaded last (patched in place, backed up): ``model`` is loaded first,
    so an erased clone sampled before cannot show through."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().clone() for k, v in model.model_state_dict(filter_prefix="diffusion_model.").items()}


# "cat" erased to "dog", measured in latent space (issue #13): prompts in no list (not preserved, not
# in the bank, not a probe; test_safe_defaults_comfyui.py checks it) and the reference pair
UNRELATED = ("a red car on a street", "a bowl of fruit on a table", "a mountain lake at sunset",
             "a portrait of an old man", "a city skyline at night")
_REFERENCE = ("cat", "dog", "a photo of a cat", "a photo of a dog")


def _mean_abs(a, b):
    return (a - b).abs().mean().item()


def originals(model, clip, cfgs):
    """The original model's latents ``{(prompt, cfg): latent}`` for the reference and unrelated prompts."""
    return {(p, c): sample(model, clip, p, cfg=c, steps=2) for c in cfgs for p in (*_REFERENCE, *UNRELATED)}


def cat_to_dog(erased, clip, original, cfg):
    """``(r, drifts)`` of an erased model at ``cfg``: r = how far erased "cat" is from the original "dog",
    in units of the cat-dog gap; one drift per :data:`UNRELATED` prompt, in units of the
    "a photo of a cat" - "a photo of a dog" gap (0 is best for both)."""
    gap = _mean_abs(original["cat", cfg], original["dog", cfg])
    unit = _mean_abs(original["a photo of a cat", cfg], original["a photo of a dog", cfg])
    r = _mean_abs(sample(erased, clip, "cat", cfg=cfg, steps=2), original["dog", cfg]) / gap
    return r, [_mean_abs(sample(erased, clip, p, cfg=cfg, steps=2), original[p, cfg]) / unit for p in UNRELATED]
