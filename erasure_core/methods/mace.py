"""MACE's closed-form refinement (Lu et al., CVPR 2024, arXiv 2403.06135, stage 1 "CFR").

For every templated prompt pair (target prompt, anchor prompt) MACE aligns the token rows the two
prompts share: the common prefix (identical rows: CLIP is causal, so these act as "keep" rows),
the common suffix and end-of-text row, and the padding aligned from the end. The concept's own
words are *left out*: the edit removes the concept from the surrounding words, where it leaks
through attention ("residual concept information"). The aligned old rows are keys, the matching
new rows' original outputs their targets, solved in the shared closed form with a preservation
prior (the preserve prompts, all rows).

The reference configs use λ = 0 with a prior of all 616k MS-COCO captions; without that prior the
system is singular. We keep λ > 0 (the node's `lamb`, 5 by default; 0.5 in the preset ``paper``), which leaves directions no
key constrains at their original weights: the minimum-change solution of the same problem.
Stages 2–3 (per-concept LoRA training with segmentation masks, then fusion) need image training
and are out of scope for a graph node.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..architectures import AttentionSite
from ..concepts import BUILTIN_TEMPLATES, ConceptSet
from ..edit.linalg import GRAM_CHUNK, anchored_multiplier_from_grams, cross_gram, gram
from ..edit.patch import PatchSet
from ..errors import ConceptError
from ..text.encoded import EncodedText, TextEncoder, TokenPick
from . import register
from .closed_form import (
    ClosedFormConfig,
    Progress,
    anchored_patch,
    default_device,
    describe_run,
    encode_concepts,
    patch_from_multipliers,
)

__all__ = ["MACEConfig", "aligned_rows", "solve"]


@dataclass(frozen=True)
class MACEConfig(ClosedFormConfig):
    """MACE CFR uses the shared options; ``token_pick`` is replaced by MACE's own alignment."""


def aligned_rows(enc: EncodedText, old: str, new: str) -> tuple[list[int], list[int]]:
    """Row indices of ``old`` and the matching rows of ``new``: common prefix, common suffix up to
    the end-of-text token, and the padding aligned from the end; differing words excluded."""
    if enc.token_ids is None:
        raise ConceptError("MACE needs the token ids of each prompt, but this text encoder gives none. "
                           "Use UCE, SPEED or RECE with it.", input_name="clip")
    i, j = enc.index(old), enc.index(new)
    o, n = enc.token_ids[i].tolist(), enc.token_ids[j].tolist()
    eo, en = int(enc.eot_index[i]), int(enc.eot_index[j])
    length = len(o)
    prefix = 0
    while prefix <= min(eo, en) and o[prefix] == n[prefix]:
        prefix += 1
    suffix = 0
    while eo - suffix >= prefix and en - suffix >= prefix and o[eo - suffix] == n[en - suffix]:
        suffix += 1
    pads = min(length - 1 - eo, length - 1 - en)
    old_rows = [*range(prefix), *range(eo - suffix + 1, eo + 1), *range(length - pads, length)]
    new_rows = [*range(prefix), *range(en - suffix + 1, en + 1), *range(length - pads, length)]
    return old_rows, new_rows


@torch.no_grad()
def solve(
    sites: Sequence[AttentionSite],
    concepts: ConceptSet,
    encoder: TextEncoder,
    config: MACEConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> PatchSet:
    """Erase ``concepts`` with MACE's closed-form refinement (one solve per key width)."""
    config = config or MACEConfig()
    started = time.perf_counter()
    if not concepts.templates:  # MACE always erases templated prompts (30 per concept)
        concepts = replace(concepts, templates=dict(BUILTIN_TEMPLATES))
    keys = encode_concepts(concepts, encoder, sites, preserve_empty=config.preserve_empty_prompt,
                           bank=config.preserve_bank)
    device = torch.device(device) if device is not None else default_device(sites)
    aligned = [(old, new, *aligned_rows(keys.enc, old, new)) for old, new in keys.pairs]
    cp = keys.preserve(TokenPick.ALL).to(device)
    meta = describe_run("mace", concepts, config)

    def rows_of(batch: Sequence[tuple[str, str, list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        ce = torch.cat([keys.rows(old)[o] for old, _, o, _ in batch]).to(device)
        return ce, torch.cat([keys.rows(new)[n] for _, new, _, n in batch]).to(device)

    total, width = sum(len(o) for _, _, o, _ in aligned), keys.enc.width
    if total <= width:  # a low-rank edit: one solve over the rows
        return anchored_patch(sites, (*rows_of(aligned), cp), config, "MACE", meta, device=device,
                              progress=progress, started=started)
    # Full rank (templates x aligned rows outnumber the width): the rows enter only through their
    # Grams, accumulated over batches of prompt pairs, so no copy of all rows is ever held.
    dtype = config.solve_dtype.torch
    g_ee = torch.zeros(width, width, dtype=dtype, device=device)
    g_ae = torch.zeros_like(g_ee)
    start = 0
    while start < len(aligned):
        stop, size = start, 0
        while stop < len(aligned) and size < GRAM_CHUNK:
            size += len(aligned[stop][2])
            stop += 1
        ce, ca = rows_of(aligned[start:stop])
        g_ee += gram(ce, dtype)
        g_ae += cross_gram(ca, ce, dtype)
        start = stop
    mult = anchored_multiplier_from_grams(g_ee, g_ae, gram(cp, dtype), erase_scale=config.erase_scale,
                                          preserve_scale=config.preserve_scale, lamb=config.lamb, method="MACE",
                                          rows=(total, len(cp)))
    return patch_from_multipliers(sites, lambda _site, _w: mult, meta, "MACE", progress, started,
                                  one_per_width=True)


PRESETS: dict[str, dict[str, object]] = {"paper": {"preserve_bank": False, "lamb": 0.5}}

register("mace", MACEConfig, solve,
         "MACE closed-form refinement (arXiv 2403.06135): remove the concept from the words around it.",
         presets=PRESETS)
