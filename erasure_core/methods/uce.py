"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024, arXiv 2308.14761).

Every cross-attention K and V projection is re-solved in closed form (eq. 7) so that each
target's key rows produce what the original layer produced for its anchor, preserved prompts keep
their outputs, and λ keeps the weights near the original. Multiple concepts are summed into one
system, as in the paper. Defaults follow the paper-era code (``train_erase.py``): erase scale 1,
preserve scale 0.1, last word + EOT + padding rows, and the empty prompt preserved; two defaults
depart from it (issue #13; preset ``paper (train_erase.py)`` restores it): the preserve bank is on
and λ is 5, not 0.5. The ridge is the only term that holds directions no preserved prompt covers:
in a real-ComfyUI test (random full-size CLIP-L) λ 5 moved five unrelated prompts 0.30 of the
cat-dog gap instead of 0.50, and "cat" still sampled as "dog" (r 0.011 / 0.042 at CFG 1 / 7).
UCE's current code (``uce_sd_erase.py``) corresponds to ``token_pick = last subject token`` with
``preserve_scale = 1``.

UCE's Flux code (``uce_flux_edit.py``) edits the text projection (``txt_in``) with the T5 last-subject
token and the pooled-CLIP input (``vector_in.in_layer``) with the pooled vector, λ = 0.5, erase and
preserve scale 1, T5 prompts padded to ``max_sequence_length`` (512 for dev, 256 for schnell): the
presets ``flux-dev reference`` and ``flux-schnell reference``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..architectures import AttentionSite
from ..concepts import ConceptSet
from ..config import option
from ..edit.patch import PatchSet
from ..text.encoded import TextEncoder, TokenPick, rows_for
from . import register
from .closed_form import (
    ClosedFormConfig,
    Progress,
    SolveDtype,
    anchored_patch,
    default_device,
    describe_run,
    encode_concepts,
)

__all__ = ["UCEConfig", "solve"]


TEXT_LENGTH_MAX = 512
"""The longest ``text_length``: T5's training length and UCE's Flux-dev setting. Every prompt's rows
are kept in memory while the erase runs (a T5 row of 4,096 floats is 16 KiB), so the 4,096 allowed
before let a few hundred preserve prompts fill tens of GB of RAM."""


@dataclass(frozen=True)
class UCEConfig(ClosedFormConfig):
    """UCE uses the shared closed-form options (see :class:`ClosedFormConfig`) and the length the
    concepts' text is padded to (``text_length``), which the caller's encoder applies."""

    text_length: int = option(
        0, "Pad each concept's T5 (or other DiT text) tokens to this many before encoding. 0 pads as ComfyUI "
        "pads your prompts (Flux: 256). Flux's T5 reads its padding without a mask, so every row depends on "
        "it; UCE's Flux code uses max_sequence_length 512 (dev) or 256 (schnell), the most T5 was trained on "
        "(each prompt then holds 512 rows: 8 MiB of Flux's T5). Ignored by SD1.x/SDXL CLIP.",
        min=0, max=TEXT_LENGTH_MAX, step=1)


_FLUX_REFERENCE = {"token_pick": TokenPick.LAST_SUBJECT, "erase_scale": 1.0, "preserve_scale": 1.0, "lamb": 0.5,
                   "preserve_empty_prompt": False, "solve_dtype": SolveDtype.FLOAT32,
                   "preserve_bank": False}  # no default preserve set, no bank; fp32


@torch.no_grad()
def solve(
    sites: Sequence[AttentionSite],
    concepts: ConceptSet,
    encoder: TextEncoder,
    config: UCEConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> PatchSet:
    """Erase ``concepts`` from ``sites`` with UCE; returns low-rank deltas keyed by site key.

    Legend (eq. 7): ``c_e, c_a, c_p: [R, d]`` target, anchor and preserve key rows;
    ``W₀: [d_out, d]`` a site's current weight. One solve per key width serves every site.
    """
    config = config or UCEConfig()
    started = time.perf_counter()
    keys = encode_concepts(concepts, encoder, sites, preserve_empty=config.preserve_empty_prompt,
                           rows=rows_for(config.token_pick), bank=config.preserve_bank)
    device = torch.device(device) if device is not None else default_device(sites)
    ce, ca = keys.erase(config.token_pick)
    cp = keys.preserve(config.token_pick)
    meta = describe_run("uce", concepts, config)
    return anchored_patch(sites, (ce, ca, cp), config, "UCE", meta, device=device, progress=progress,
                          started=started)


PRESETS: dict[str, dict[str, object]] = {
    # the papers' exact settings: no default bank (issue #13)
    "paper (train_erase.py)": {"token_pick": TokenPick.LAST_WORD_EOT_PADDING, "erase_scale": 1.0,
                               "preserve_scale": 0.1, "lamb": 0.5, "preserve_empty_prompt": True,
                               "preserve_bank": False},
    "current code (uce_sd_erase.py)": {"token_pick": TokenPick.LAST_SUBJECT, "erase_scale": 1.0,
                                       "preserve_scale": 1.0, "lamb": 0.5, "preserve_empty_prompt": False,
                                       "preserve_bank": False},
    "flux-dev reference": _FLUX_REFERENCE | {"text_length": 512},
    "flux-schnell reference": _FLUX_REFERENCE | {"text_length": 256},
}

register("uce", UCEConfig, solve,
         "UCE (arXiv 2308.14761): closed-form K/V edit mapping each target to its anchor.", presets=PRESETS)
