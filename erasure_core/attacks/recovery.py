"""The recovery score every AttackPrompt mode reports, with one definition.

Let ``f(M, x)`` be the stacked outputs of every cross-attention K/V projection of model ``M`` for
the token rows ``x [T, d]`` (all sites, all rows). For the concept prompt's encoding ``c`` and an
attack conditioning ``a``::

    r = 1 − ‖f(erased, a) − f(original, c)‖² / ‖f(erased, c) − f(original, c)‖²

the share of the erased-vs-original gap that the attack closes: 1 means the erased model responds
to the attack exactly as the original responded to the concept, 0 means no better than typing the
concept, below 0 means further away. ``soft_prompt`` also reports the same ratio in noise-prediction
space, over its sampled timesteps and noises (``‖ε_e(a) − ε_o(c)‖² / ‖ε_e(c) − ε_o(c)‖²``).

Sums over sites use three ``d × d`` Gram matrices (``Σ W_eᵀW_e``, ``Σ W_eᵀW_o``, ``Σ W_oᵀW_o``), so
scoring any number of candidates costs no further pass over the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..architectures import AttentionSite, LazyWeight, RowTransform, sites_by_stream
from ..errors import ArchitectureError

__all__ = ["IDENTICAL_TOLERANCE", "KVGrams", "Recovery", "kv_distance", "kv_grams", "kv_recovery",
           "layer_site_groups", "recovery_from_distances", "token_sites"]

IDENTICAL_TOLERANCE = 1e-10
"""A gap below this share of ``‖f(original, c)‖²`` means the erased model answers the concept as
the original does (nothing was erased for it)."""


@dataclass(frozen=True)
class KVGrams:
    """Sums over the K/V sites of one key width: ``erased = Σ W_eᵀW_e``, ``cross = Σ W_eᵀW_o``,
    ``original = Σ W_oᵀW_o`` (``[d, d]``), and how many sites went in."""

    erased: torch.Tensor
    cross: torch.Tensor
    original: torch.Tensor
    sites: int
    identical_weights: bool

    @property
    def width(self) -> int:
        return int(self.erased.shape[0])


def kv_grams(erased: Sequence[AttentionSite], original: Sequence[AttentionSite], *,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
             progress: Callable[[int, int], None] | None = None) -> KVGrams:
    """The three Gram sums over paired sites (matched by key). Both models must have the same
    sites with the same shapes, all of one key width (the text context width)."""
    by_key = {s.key: s for s in original}
    if sorted(by_key) != sorted(s.key for s in erased):
        only_e = sorted({s.key for s in erased} - set(by_key))
        only_o = sorted(set(by_key) - {s.key for s in erased})
        raise ArchitectureError(
            "the erased and the original model must be the same architecture (the same cross-"
            f"attention sites), but {len(only_e)} sites are only in the erased model and {len(only_o)} "
            f"only in the original (first: '{(only_e or only_o)[0]}'). Connect the model the erasure "
            "was made from.", input_name="original_model")
    widths = {s.in_features for s in erased}
    if len(widths) != 1:
        raise ArchitectureError(f"every K/V site must read one text width, but got {sorted(widths)}.",
                                input_name="model")
    d = widths.pop()
    ge = torch.zeros(d, d, dtype=dtype, device=device)
    gx, go = ge.clone(), ge.clone()
    identical = True
    for i, site in enumerate(erased):
        twin = by_key[site.key]
        if tuple(twin.weight.shape) != tuple(site.weight.shape):
            raise ArchitectureError(
                f"the erased and the original model must have the same weight shapes, but '{site.key}' "
                f"is {tuple(site.weight.shape)} in one and {tuple(twin.weight.shape)} in the other. "
                "Connect the model the erasure was made from.", input_name="original_model")
        we = site.tensor().to(device, dtype)
        wo = twin.tensor().to(device, dtype)
        identical = identical and torch.equal(we, wo)
        ge += we.T @ we
        gx += we.T @ wo
        go += wo.T @ wo
        if progress is not None:
            progress(i + 1, len(erased))
    return KVGrams(ge, gx, go, len(erased), identical)


def token_sites(sites: Sequence[AttentionSite]) -> tuple[list[AttentionSite], Callable[[torch.Tensor], torch.Tensor]]:
    """The sites that read the conditioning's token rows (a DiT's pooled input is left out), and the
    map from conditioning rows to what they read. A per-row RMSNorm (Qwen-Image, Lumina 2) is split:
    its scale ``g`` is folded into each weight (``W diag(g)``) and the map is the bare normalisation
    ``x / rms(x)``, so the attacks and the score work in one space for both models (each model's own
    ``g`` in its weights). UNets: every site, and the identity."""
    tokens = [s for s in sites if s.stream == "tokens"]
    transform = next((s.transform for s in tokens if s.transform is not None), None)
    if transform is None:
        return tokens, lambda rows: rows
    folded = []
    for site in tokens:
        scale = site.transform.scale if site.transform is not None else None

        def load(site: AttentionSite = site, scale: torch.Tensor | None = scale) -> torch.Tensor:
            weight = site.tensor()
            return weight * scale.to(weight) if scale is not None else weight

        folded.append(AttentionSite(site.key, LazyWeight(tuple(site.weight.shape), load), "tokens"))
    unit = RowTransform(transform.key, transform.eps, torch.ones_like(transform.scale))
    return folded, unit


def layer_site_groups(sites: Sequence[AttentionSite]) -> dict[str, list[AttentionSite]]:
    """The sites that read one layer of a second encoder's per-layer states (HiDream's Llama), by
    stream (``"llama:k"``): each group is a K/V space of its own, scored and attacked on its own rows."""
    return sites_by_stream(sites, tokens=False)


def kv_distance(grams: KVGrams, erased_rows: torch.Tensor | None, original_rows: torch.Tensor | None) -> float:
    """``Σ_sites ‖W_e aᵀ − W_o cᵀ‖²_F`` for token rows ``a`` (through the erased weights) and ``c``
    (through the original ones), both ``[T, d]``; either may be None (taken as zero rows).

    ``= tr(A G_e Aᵀ) − 2 tr(A X Cᵀ) + tr(C G_o Cᵀ)``, evaluated in the Grams' precision.
    """
    total = 0.0
    a = None if erased_rows is None else erased_rows.to(grams.erased)
    c = None if original_rows is None else original_rows.to(grams.erased)
    if a is not None:
        total += float(((a @ grams.erased) * a).sum())
    if c is not None:
        total += float(((c @ grams.original) * c).sum())
    if a is not None and c is not None:
        if a.shape != c.shape:
            raise ValueError(f"rows must have one shape, got {tuple(a.shape)} and {tuple(c.shape)}")
        total -= 2.0 * float(((a @ grams.cross) * c).sum())
    return max(total, 0.0)


@dataclass(frozen=True)
class Recovery:
    """One recovery figure: ``score = 1 − residual / gap`` in ``space``.

    ``gap = ‖f_e(c) − f_o(c)‖²``, ``residual = ‖f_e(a) − f_o(c)‖²``, ``scale = ‖f_o(c)‖²``.
    ``identical`` when the gap is below ``IDENTICAL_TOLERANCE · scale``: the erased model already
    answers the concept as the original, so the score is 1 trivially.
    """

    score: float
    gap: float
    residual: float
    scale: float
    space: str

    @property
    def identical(self) -> bool:
        return self.gap <= IDENTICAL_TOLERANCE * self.scale

    def describe(self) -> str:
        if self.identical:
            return (f"{self.space}: the erased model responds to the concept as the original does "
                    "(no gap to close), so recovery is trivially 1")
        share = math.sqrt(self.gap / self.scale) if self.scale > 0 else float("nan")
        return (f"{self.space}: recovery {self.score:.3f} (residual {self.residual:.4g} of gap "
                f"{self.gap:.4g}; the erasure moved the concept's response by {share:.1%})")


def recovery_from_distances(residual: float, gap: float, scale: float, space: str) -> Recovery:
    """A :class:`Recovery` from the two squared distances and the scale ``‖f_o(c)‖²``."""
    if gap <= IDENTICAL_TOLERANCE * scale:
        return Recovery(1.0, gap, residual, scale, space)
    return Recovery(1.0 - residual / gap, gap, residual, scale, space)


def kv_recovery(grams: KVGrams, attack_rows: torch.Tensor, concept_rows: torch.Tensor,
                more: Sequence[tuple[KVGrams, torch.Tensor, torch.Tensor]] = ()) -> Recovery:
    """The K/V-space recovery of ``attack_rows`` for the concept's ``concept_rows`` (both ``[T, d]``);
    ``more`` adds further streams' ``(grams, attack rows, concept rows)`` (HiDream's Llama layers), each
    distance summed over every stream as over every site."""
    parts = [(grams, attack_rows, concept_rows), *more]
    return recovery_from_distances(sum(kv_distance(g, a, c) for g, a, c in parts),
                                   sum(kv_distance(g, c, c) for g, _, c in parts),
                                   sum(kv_distance(g, None, c) for g, _, c in parts), "cross-attention K/V")

