"""AttackPrompt: red-team an erased model (research/attacks_eval.md §A).

One module per attack; the model-facing parts (encoding text, running the UNet) are callables the
caller passes in, so the math runs on tiny fakes in tests and on ComfyUI's models in a graph.

* :mod:`.recovery` — the score every mode reports: the share of the erased-vs-original gap an
  attack closes, in cross-attention K/V space (and noise-prediction space for ``soft_prompt``).
* :mod:`.closed_form` — RECE's closed-form adversarial embedding over every K/V site.
* :mod:`.concept_vector` — Ring-A-Bell: a concept direction from paired prompts, and a seeded
  genetic search for a readable prompt that encodes close to the target.
* :mod:`.soft_prompt` — gradient attack on a few prefix word embeddings (AdvUnlearn /
  UnlearnDiffAtk in spirit), with nearest-token projection to a readable prompt.
"""

from __future__ import annotations

from .closed_form import closed_form_attack
from .concept_vector import SearchResult, concept_direction, decode_bpe_tokens, genetic_search
from .recovery import (
    KVGrams,
    Recovery,
    kv_distance,
    kv_grams,
    kv_recovery,
    layer_site_groups,
    recovery_from_distances,
    token_sites,
)
from .soft_prompt import (
    SoftPromptResult,
    draw_noise_samples,
    eps_from_denoised,
    nearest_tokens,
    optimise_prefix,
)

__all__ = [
    "KVGrams",
    "Recovery",
    "SearchResult",
    "SoftPromptResult",
    "closed_form_attack",
    "concept_direction",
    "decode_bpe_tokens",
    "draw_noise_samples",
    "eps_from_denoised",
    "genetic_search",
    "kv_distance",
    "kv_grams",
    "kv_recovery",
    "layer_site_groups",
    "token_sites",
    "nearest_tokens",
    "optimise_prefix",
    "recovery_from_distances",
]
