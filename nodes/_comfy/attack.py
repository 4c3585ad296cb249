"""The soft-prompt attack on ComfyUI models: a differentiable CLIP forward and the optimisation loop
against the erased MODEL (research/attacks_eval.md §A.7, research/comfyui.md §1.9)."""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management
import torch

from ...erasure_core import (
    ArchitectureError,
    ConceptError,
    ConfigError,
    Progress,
)
from ...erasure_core.attacks import (
    draw_noise_samples,
    eps_from_denoised,
    nearest_tokens,
    optimise_prefix,
)
from .runtime import _unet_prefix_keys, compute_device
from .text import ClipTokenSpace, _one_window, _prepare, _selected_layers, encode_text

logger = logging.getLogger(__name__)




class DifferentiableClip:
    """An out-of-place forward of a one-tower CLIP (SD1.x, SD2.x) from input word embeddings, with
    the CLIP's layer choice and its (patched) weights cloned as float32 outside inference mode.

    ComfyUI's own forward adds residuals in place (``x += ...``), which breaks backpropagation to
    the inputs, and its weights are inference tensors (research/comfyui.md §1.9, §3.6).
    """

    def __init__(self, clip: Any, device: torch.device):

        model = clip.cond_stage_model
        name = getattr(model, "clip", None)
        tower = getattr(model, name, None) if isinstance(name, str) else None
        text_model = getattr(getattr(tower, "transformer", None), "text_model", None)
        if text_model is None:
            raise ArchitectureError(
                "soft_prompt needs a model with one CLIP text encoder (SD1.x or SD2.x), but this CLIP has "
                "several (SDXL) or an unknown layout. Use closed_form or concept_vector for it.", input_name="clip")
        _prepare(clip)  # the layer choice set on the tower, and CLIP LoRAs applied to the loaded weights
        layer = tower.layer
        if layer == "all":
            model.reset_clip_options()
            raise ArchitectureError("soft_prompt needs one CLIP output layer, but this CLIP returns all.",
                                    input_name="clip")
        self.layers = list(_selected_layers(tower))  # through the selected one (clip skip); later ones never run
        model.reset_clip_options()
        self.key, self.special = name, dict(tower.special_tokens)
        self.final_norm = layer == "last" or tower.layer_norm_hidden_state  # text._final's rule
        self.masks = tower.enable_attention_masks
        self.final_eps = text_model.final_layer_norm.eps
        with torch.inference_mode(False):
            self.p = {n: v.detach().to(device=device, dtype=torch.float32, copy=True)
                      for n, v in text_model.named_parameters()}
        self.table = self.p["embeddings.token_embedding.weight"]
        self.device = device

    def forward(self, embeds: torch.Tensor, eot: int) -> torch.Tensor:
        """``[B, T, D]`` input embeddings (position embeddings not yet added) -> encoder output."""
        p, (b, t, d) = self.p, embeds.shape
        x = embeds + p["embeddings.position_embedding.weight"][:t]
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        if self.masks:
            mask = mask.masked_fill(torch.arange(t, device=x.device)[None, :] > eot, float("-inf"))
        for i, layer in enumerate(self.layers):
            pre = f"encoder.layers.{i}."

            def lin(x: torch.Tensor, name: str, pre: str = pre) -> torch.Tensor:
                return torch.nn.functional.linear(x, p[pre + name + ".weight"], p[pre + name + ".bias"])

            h = torch.nn.functional.layer_norm(x, (d,), p[pre + "layer_norm1.weight"], p[pre + "layer_norm1.bias"],
                                               layer.layer_norm1.eps)
            heads = layer.self_attn.heads
            q, k, v = (lin(h, f"self_attn.{n}_proj").view(b, t, heads, d // heads).transpose(1, 2) for n in "qkv")
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + lin(o.transpose(1, 2).reshape(b, t, d), "self_attn.out_proj")
            h = torch.nn.functional.layer_norm(x, (d,), p[pre + "layer_norm2.weight"], p[pre + "layer_norm2.bias"],
                                               layer.layer_norm2.eps)
            x = x + lin(layer.mlp.activation(lin(h, "mlp.fc1")), "mlp.fc2")
        if self.final_norm:
            x = torch.nn.functional.layer_norm(x, (d,), p["final_layer_norm.weight"], p["final_layer_norm.bias"],
                                               self.final_eps)
        return x



def _predict_eps(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:

    context = cond.reshape(1, -1, cond.shape[-1]).expand(x.shape[0], -1, -1)
    denoised = model.model.apply_model(x, sigma, c_crossattn=context)
    return eps_from_denoised(x, denoised.float(), sigma)



def _release(patcher: Any) -> None:
    """Unload ``patcher`` now, restoring the module's own weights: otherwise its rebuilt float32
    copy of every UNet weight (one whole UNet) stays loaded after the node until another model is
    loaded (ComfyUI hands a dead clone's slot to its parent, weights and all)."""
    loaded = getattr(comfy.model_management, "current_loaded_models", [])
    for i in reversed(range(len(loaded))):
        if loaded[i].model is patcher:
            loaded[i].model_unload()
            loaded.pop(i)


def check_latent(model: Any, latent: dict | None) -> None:
    """soft_prompt's ``latent`` (None: zeros are used): a non-empty ``[batch, channels, height,
    width]`` LATENT with the erased model's latent channels, refused before any work."""
    if latent is None:
        return
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ConfigError(f"latent must be a LATENT image batch [batch, channels, height, width], but got {got}. "
                          "Connect a KSampler or VAE Encode output, or leave latent unconnected.",
                          input_name="latent")
    if samples.numel() == 0:
        raise ConfigError(f"latent must hold at least one latent image, but it is empty (shape "
                          f"{tuple(samples.shape)}). Connect a latent with one image, e.g. KSampler's output.",
                          input_name="latent")
    latent_format = getattr(getattr(model, "model", None), "latent_format", None)
    channels = getattr(latent_format, "latent_channels", None)
    if channels is not None and samples.shape[1] != channels:
        raise ConfigError(f"latent must have this model's {channels} latent channels, but it has {samples.shape[1]} "
                          f"(shape {tuple(samples.shape)}: a latent of another model family). Connect a latent "
                          "made by this checkpoint (its KSampler or VAE Encode).", input_name="latent")


def soft_prompt_attack(erased: Any, original: Any, clip: Any, concept: str, *, prefix_tokens: int, steps: int,
                       lr: float, seed: int, noise_samples: int, latent: dict | None,
                       progress: Progress | None) -> dict[str, Any]:
    """The soft-prompt attack on ComfyUI models (research/attacks_eval.md §A.7, comfyui.md §1.9).

    Noise targets come from the original model (no gradients); the erased model is then re-loaded
    outside inference mode on a clone whose every UNet weight carries a zero-strength patch, so
    its weights are rebuilt as ordinary tensors and gradients reach the prefix embeddings.
    ``latent`` has passed :func:`check_latent` (Attack Prompt checks it before any work).
    """

    device = compute_device()
    text = DifferentiableClip(clip, device)
    tokens = _one_window(clip, concept, "concept")
    if len(tokens) != 1:
        raise ConceptError("soft_prompt needs a one-stream CLIP.", input_name="clip")
    stream, windows = next(iter(tokens.items()))
    ids = [tok[0] for tok in windows[0]]
    if not all(isinstance(i, int) for i in ids):
        raise ConceptError("concept must be plain text for soft_prompt (no embedding: references).",
                           input_name="concept")
    end = text.special.get("end", ids[-1])
    eot = next(j for j in range(1, len(ids)) if ids[j] == end)
    if eot + prefix_tokens >= len(ids):
        raise ConceptError(f"concept plus {prefix_tokens} prefix tokens must fit one 75-token window; shorten "
                           "the concept or lower prefix_tokens.", input_name="concept")
    body = ids[1 : len(ids) - prefix_tokens]
    concept_cond, _ = encode_text(clip, concept)

    space = ClipTokenSpace(clip)
    gen = torch.Generator().manual_seed(int(seed))
    start_ids = space.vocabulary[torch.randint(len(space.vocabulary), (prefix_tokens,), generator=gen)]
    inner = erased.model
    channels = inner.latent_format.latent_channels
    x0 = (inner.process_latent_in(latent["samples"][:1].float()) if latent is not None
          else torch.zeros(1, channels, 64, 64))
    percents, noise = draw_noise_samples(noise_samples, tuple(x0.shape[1:]), seed)
    sampling = erased.get_model_object("model_sampling")
    sigma = torch.tensor([float(sampling.percent_to_sigma(float(pc))) for pc in percents])
    x = (x0 + noise * sigma.view(-1, 1, 1, 1)).to(device)
    sigma, cond_c = sigma.to(device), concept_cond.to(device)

    with torch.no_grad():
        comfy.model_management.load_models_gpu([original])
        eps_orig = _predict_eps(original, x, sigma, cond_c).float()
        comfy.model_management.load_models_gpu([erased])
        eps_erased = _predict_eps(erased, x, sigma, cond_c).float()

    trainable = erased.clone()
    trainable.add_patches(dict.fromkeys(_unet_prefix_keys(trainable), (None,)), 0.0, 1.0)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            comfy.model_management.load_models_gpu([trainable], force_full_load=True)
            xg, sg, target = x.clone(), sigma.clone(), eps_orig.clone()
            table = text.table
            head = table[ids[:1]].clone()
            tail = table[torch.tensor(body, device=table.device)].clone()

            def embed(prefix: torch.Tensor) -> torch.Tensor:
                return torch.cat([head, prefix, tail])[None]

            def loss(prefix: torch.Tensor) -> torch.Tensor:
                cond = text.forward(embed(prefix), eot + prefix_tokens)
                return ((_predict_eps(trainable, xg, sg, cond) - target) ** 2).mean()

            result = optimise_prefix(table[start_ids.to(table.device)], loss, steps=steps, lr=lr, progress=progress)
            prefix = result.prefix
            window = [windows[0][0], *[(row.clone(), 1.0) for row in prefix.cpu()], *[(i, 1.0) for i in body]]
            cond, pooled = clip.encode_from_tokens({stream: [window]}, return_pooled=True)
            with torch.no_grad():
                eps_attack = _predict_eps(trainable, xg, sg, cond.to(device).float()).float()
    finally:
        _release(trainable)
    nearest = nearest_tokens(prefix, table, space.vocabulary.to(table.device))
    return {
        "cond": cond[0].detach().float().cpu(), "pooled": pooled, "prefix": prefix.cpu(),
        "losses": result.losses, "best_step": result.best_step, "embedding_key": text.key,
        "nearest": nearest.tolist(), "text": (space.decode(nearest.tolist()) + " " + concept).strip(),
        "eps": (float(((eps_attack - eps_orig) ** 2).sum()), float(((eps_erased - eps_orig) ** 2).sum()),
                float((eps_orig ** 2).sum())),
    }
