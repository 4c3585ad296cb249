"""UCE with RealEra's neighbour mining (Liu et al., arXiv 2410.09140; no reference code).

A concept's meaning is not one point of the text space: paraphrases and near-synonyms land near
its embedding and bring it back ("concept residue"). RealEra samples neighbours ``e + η`` of every
target key row ``e`` with a bounded distance and a cosine in a band,
``‖η‖ ≤ D₁‖e‖`` and ``cos(e, e + η) ∈ [S₁, S₂]``, and erases them toward the same anchor rows,
while the preservation term keeps unrelated concepts (its "beyond-concept regularisation"). The
closed form is UCE's; only the key set grows. RealEra's LoRA noise-alignment stage needs image
training and is not part of this edit.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..architectures import AttentionSite
from ..concepts import ConceptSet
from ..config import option
from ..edit.linalg import GRAM_CHUNK, anchored_multiplier_from_grams, cross_gram, gram
from ..edit.patch import PatchSet
from ..errors import ConfigError
from ..text.encoded import TextEncoder, TokenPick, erase_rows
from . import register
from .closed_form import (
    ClosedFormConfig,
    ConceptKeys,
    Progress,
    anchored_patch,
    default_device,
    describe_run,
    encode_concepts,
    patch_from_multipliers,
)

__all__ = ["NeighbourRows", "RealEraConfig", "neighbour_rows", "sample_neighbours", "solve"]


class NeighbourRows(str, Enum):
    CONCEPT = "concept rows"
    ALL = "all key rows"


@dataclass(frozen=True)
class RealEraConfig(ClosedFormConfig):
    """UCE's options plus the neighbour sampler's."""

    neighbours: int = option(8, "Neighbours sampled per target key row. More close the residue gap further "
                                "but spend preservation.", min=0, max=256)
    max_distance: float = option(0.5, "D₁: largest distance of a neighbour, relative to the row's norm.",
                                 min=0.0, max=2.0, step=0.01)
    min_cosine: float = option(0.9, "S₁: smallest cosine between a row and its neighbour.", min=-1.0, max=1.0,
                               step=0.01)
    max_cosine: float = option(0.99, "S₂: largest cosine (below 1, so neighbours differ from the row).",
                               min=-1.0, max=1.0, step=0.01)
    random_seed: int = option(0, "Seed of the neighbour sampler (fixed, so the edit is reproducible).", min=0,
                              max=2**31 - 1)
    neighbour_rows: NeighbourRows = option(
        NeighbourRows.CONCEPT, "Which key rows get neighbours. 'concept rows' (default): the concept's own word "
        "row only; the end-of-text and padding rows look alike in every prompt, and their neighbours cover "
        "unrelated prompts, which then move (3.6x the target gap in a full-size SD1.5 test). 'all key rows': "
        "every erased row, as this pack did before (use it to reproduce older runs).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_cosine > self.max_cosine:
            raise ConfigError(f"min_cosine must not exceed max_cosine, but got {self.min_cosine} > "
                              f"{self.max_cosine}. Swap them.", input_name="min_cosine")
        if self.max_distance < math.sqrt(2 - 2 * self.max_cosine):
            raise ConfigError(
                f"max_distance must admit the cosine band (a neighbour at cosine {self.max_cosine} lies "
                f"{math.sqrt(2 - 2 * self.max_cosine):.3f} away), but got {self.max_distance}. Raise "
                "max_distance or max_cosine.", input_name="max_distance")


def sample_neighbours(rows: torch.Tensor, count: int, config: RealEraConfig,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` neighbours of every row ``[R, d]`` -> ``([R * count, d], source row index)``.

    Each neighbour keeps the row's norm and turns it by an angle whose cosine is drawn in
    ``[S₁, S₂]`` (capped so that the distance stays within ``D₁‖e‖``) toward a random direction.
    """
    r, d = rows.shape
    norm = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = rows / norm
    # distance of a same-norm neighbour at cosine c is ‖e‖ sqrt(2 - 2c): the band's lower end
    lowest = max(config.min_cosine, 1 - config.max_distance**2 / 2)
    cos = lowest + (config.max_cosine - lowest) * torch.rand(r, count, 1, generator=generator, dtype=rows.dtype)
    direction = torch.randn(r, count, d, generator=generator, dtype=rows.dtype)
    # ⊥ the row: n − (n·u) u, as batched products (few passes over the [r, count, d] samples)
    along = torch.bmm(direction, unit[:, :, None])  # [r, count, 1]
    direction = torch.baddbmm(direction, along, unit[:, None, :], alpha=-1)
    # neighbour = ‖e‖ (cos u + sin n/‖n‖) = cos·e + (sin ‖e‖ / ‖n‖) n
    scale = torch.sqrt(1 - cos**2) * norm[:, None] / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    turned = torch.baddbmm(direction.mul_(scale), cos, rows[:, None, :])
    return turned.reshape(-1, d), torch.arange(r).repeat_interleave(count)


def neighbour_rows(keys: ConceptKeys, config: RealEraConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(neighbours [R·k, d], their anchor rows [R·k, d])`` for each erase pair, in pair order.

    One generator per prompt, seeded by its text, so the result does not depend on concept order."""
    for pair in keys.pairs if config.neighbours else []:
        yield _neighbours_of(pair, *erase_rows(keys.enc, [pair], _source_pick(config)), config)


def _source_pick(config: RealEraConfig) -> TokenPick:
    """The rows neighbours are drawn around: the concept's word row, or every erased row."""
    return TokenPick.LAST_SUBJECT if config.neighbour_rows is NeighbourRows.CONCEPT else config.token_pick


def _neighbours_of(pair: tuple[str, str], te: torch.Tensor, ta: torch.Tensor,
                   config: RealEraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of one pair's target rows ``te`` and their anchor rows (from ``ta``)."""
    seed = config.random_seed ^ int.from_bytes(hashlib.sha256(pair[0].encode()).digest()[:4], "little")
    near, source = sample_neighbours(te.float(), config.neighbours, config, torch.Generator().manual_seed(seed))
    return near, ta[source]


NEIGHBOUR_BATCH = 16384  # neighbour rows per float32 Gram


@torch.no_grad()
def solve(
    sites: Sequence[AttentionSite],
    concepts: ConceptSet,
    encoder: TextEncoder,
    config: RealEraConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> PatchSet:
    """UCE over the target rows and their sampled neighbours (each mapped to its row's anchor).

    Neighbours outnumber the target rows ``neighbours`` to one; once target and neighbour rows
    together exceed the key width the edit has full rank, and the neighbours enter only through
    their Grams, accumulated one prompt at a time (memory does not grow with their number).
    Neighbours are sampled and their own Gram taken in float32 (they are random draws: that
    rounding is far below their spread); everything else is in ``solve_dtype``."""
    config = config or RealEraConfig()
    started = time.perf_counter()
    keys = encode_concepts(concepts, encoder, sites, preserve_empty=config.preserve_empty_prompt,
                           bank=config.preserve_bank)
    device = torch.device(device) if device is not None else default_device(sites)
    by_pair = [erase_rows(keys.enc, [pair], config.token_pick) for pair in keys.pairs]  # each pair's rows once
    sources = by_pair if _source_pick(config) is config.token_pick else \
        [erase_rows(keys.enc, [pair], _source_pick(config)) for pair in keys.pairs]  # rows neighbours turn
    ce, ca = (torch.cat(rows).to(device) for rows in zip(*by_pair, strict=True))
    cp = keys.preserve(config.token_pick).to(device)
    meta = describe_run("realera", concepts, config)
    d, dtype = ce.shape[1], config.solve_dtype.torch
    if len(ce) + sum(len(te) for te, _ in sources) * config.neighbours <= d:  # small: one low-rank solve over all rows
        pairs = [_neighbours_of(pair, te, ta, config) for pair, (te, ta) in zip(keys.pairs, sources, strict=True)] \
            if config.neighbours else []
        ce = torch.cat([ce, *(n.to(device) for n, _ in pairs)])
        ca = torch.cat([ca, *(a.to(device) for _, a in pairs)])
        return anchored_patch(sites, (ce, ca, cp), config, "RealEra", meta, device=device, progress=progress,
                              started=started)
    g_ee = gram(ce, dtype)
    rows, k = len(ce), config.neighbours
    # Random samples: their Gram is taken in float32 (it errs ~1e-6, far below the sampling
    # spread, and is 2-3x faster than float64 at 8 neighbours per row) over batches of
    # ~NEIGHBOUR_BATCH rows, then added in the solve precision. Prompts are batched in the sorted
    # order of their texts, so the rounding does not depend on the order the concepts came in.
    offsets = [0, *itertools.accumulate(len(te) for te, _ in sources)]
    order = sorted(range(len(keys.pairs)), key=lambda i: keys.pairs[i])
    src_e, src_a = (torch.cat(rows).to(device) for rows in zip(*sources, strict=True))
    extra = torch.zeros_like(src_e)  # Σ_k of each source row's neighbours, aligned with the rows of src_e
    pending: list[torch.Tensor] = []

    def flush() -> None:
        g_ee.add_(gram(torch.cat(pending)).to(dtype))
        pending.clear()

    for i in order:
        near = _neighbours_of(keys.pairs[i], *sources[i], config)[0].to(device)
        extra[offsets[i] : offsets[i + 1]] = near.reshape(-1, k, near.shape[1]).sum(dim=1)
        pending.append(near)
        rows += len(near)
        if sum(len(n) for n in pending) >= NEIGHBOUR_BATCH:
            flush()
    if pending:
        flush()
    # The k neighbours of source row e share e's anchor row a: Σ a (Σ_k n)ᵀ over the source rows,
    # plus Σ a eᵀ over the erased rows (in the solve precision, chunk by chunk).
    g_ae = cross_gram(ca, ce, dtype)
    for start in range(0, len(src_e), GRAM_CHUNK):
        part = slice(start, start + GRAM_CHUNK)
        g_ae += src_a[part].to(dtype).T @ extra[part].to(dtype)
    mult = anchored_multiplier_from_grams(g_ee, g_ae, gram(cp, dtype), erase_scale=config.erase_scale,
                                          preserve_scale=config.preserve_scale, lamb=config.lamb,
                                          method="RealEra", rows=(rows, len(cp)))
    return patch_from_multipliers(sites, lambda _site, _w: mult, meta, "RealEra", progress, started,
                                  one_per_width=True)


PRESETS: dict[str, dict[str, object]] = {
    # RealEra has no reference code: this is the pack's 0.2 behaviour, the paper's sampler on every row
    "paper (0.2 behaviour)": {"preserve_bank": False, "neighbour_rows": NeighbourRows.ALL, "lamb": 0.5},
}

register("realera", RealEraConfig, solve,
         "UCE + RealEra neighbour mining (arXiv 2410.09140): also erase sampled neighbours of each target.",
         presets=PRESETS)
