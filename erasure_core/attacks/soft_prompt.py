"""Soft-prompt attack: a few prefix word embeddings optimised by gradient (research/attacks_eval.md
§A.7, AdvUnlearn's inner attack; UnlearnDiffAtk and P4D in spirit), without images.

Objective: ``mean_s ‖ε_erased(x_s, σ_s, E([p₁..p_k] ⊕ concept)) − ε_original(x_s, σ_s, E(concept))‖²``
over a fixed, seeded set of noised latents ``x_s = x₀ + σ_s n_s``: the prefix makes the erased model
predict the noise the original predicts for the concept. The variable is ``k`` word embeddings
(before the text encoder), so the result is an embedding file and, projected to the nearest
vocabulary rows, a readable prompt. The caller supplies ``loss(prefix)``; this module owns the
loop, the sampling and the projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericalError

__all__ = ["SoftPromptResult", "draw_noise_samples", "eps_from_denoised", "nearest_tokens", "optimise_prefix"]


@dataclass(frozen=True)
class SoftPromptResult:
    """The prefix with the lowest loss seen (``[k, D]``, float32, detached), the loss at each step
    (``losses[0]`` is the initial prefix's), and the step the best was found at."""

    prefix: torch.Tensor
    losses: list[float]
    best_step: int

    @property
    def best_loss(self) -> float:
        return self.losses[self.best_step]


def optimise_prefix(
    init: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> SoftPromptResult:
    """Adam on ``prefix [k, D]`` for ``steps`` steps, minimising ``loss(prefix)`` (a scalar tensor).

    Runs outside inference mode with gradients enabled whatever the caller's mode (ComfyUI runs
    nodes under ``torch.inference_mode()``); tensors ``loss`` saves for backward must not be
    inference tensors (clone them outside inference mode, see ``nodes/_comfy/attack.py``). ``progress(done, total)`` is called after every step (it may
    raise to interrupt). Returns the best prefix seen, so extra steps never make the result worse.
    """
    if steps < 1 or not lr > 0:
        raise ConfigError(f"the soft prompt needs steps ≥ 1 and lr > 0, but got {steps} and {lr}.",
                          input_name="steps")
    with torch.inference_mode(False), torch.enable_grad():
        prefix = init.detach().clone().float().requires_grad_(True)
        optimiser = torch.optim.Adam([prefix], lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        best, best_step = prefix.detach().clone(), 0
        for step in range(steps + 1):
            optimiser.zero_grad(set_to_none=True)
            value = loss(prefix)
            current = float(value.detach())
            if not torch.isfinite(value.detach()):
                raise NumericalError(f"the soft-prompt loss must stay finite, but it is {current} at step "
                                     f"{step}. Lower 'lr'.", input_name="lr")
            losses.append(current)
            if current < losses[best_step]:
                best, best_step = prefix.detach().clone(), step
            if step == steps:  # the last evaluation scores the final prefix; no update after it
                break
            value.backward()
            optimiser.step()
            if progress is not None:
                progress(step + 1, steps)
    return SoftPromptResult(best, losses, best_step)


def draw_noise_samples(count: int, shape: tuple[int, ...], seed: int, *, low: float = 0.02,
                       high: float = 0.98) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` timestep positions in ``[low, high]`` (fraction of the schedule, 0 = most noise, as
    ComfyUI's ``percent_to_sigma``) evenly stratified with a seeded jitter, and noises
    ``[count, *shape]`` from one generator seeded with ``seed``."""
    if count < 1:
        raise ConfigError(f"the soft prompt needs at least one noise sample, but got {count}.",
                          input_name="noise_samples")
    gen = torch.Generator().manual_seed(int(seed))
    edges = torch.linspace(low, high, count + 1, dtype=torch.float64)
    percents = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(count, generator=gen, dtype=torch.float64)
    noise = torch.randn((count, *shape), generator=gen)
    return percents, noise


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise a k-diffusion model predicts, ``(x − x̂₀) / σ`` for ``x = x₀ + σ ε``; holds for ε-
    and v-prediction models alike (ComfyUI's ``apply_model`` returns the denoised ``x̂₀``)."""
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def nearest_tokens(prefix: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Ids ``[k]`` of the vocabulary rows (of ``table [V, D]``) with the highest cosine similarity to
    each prefix row (PEZ's projection); ``allowed`` restricts the candidates to those ids."""
    cand = table.float() if allowed is None else table[allowed].float()
    sims = torch.nn.functional.normalize(prefix.float().to(cand.device), dim=-1) @ \
        torch.nn.functional.normalize(cand, dim=-1).T
    best = sims.argmax(dim=-1)
    return best.cpu() if allowed is None else allowed.to(best.device)[best].cpu()
