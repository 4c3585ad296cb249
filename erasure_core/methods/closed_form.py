"""What the closed-form family shares: its common options, encoding each prompt once, and turning
one right multiplier per key width into a low-rank PatchSet over every site."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..architectures import AttentionSite, LazyWeight
from ..concepts import ConceptSet
from ..config import option, validate_ranges
from ..edit.linalg import GRAM_CHUNK, MEMO_BYTES, RightMultiplier, anchored_right_multiplier, check_finite, gram, wide
from ..edit.patch import PatchEntry, PatchSet, SharedRight
from ..errors import ArchitectureError
from ..text.encoded import EncodedText, TextEncoder, TokenPick, encode, erase_rows, preserve_rows
from ..version import __version__
from .bank import bank_prompts

__all__ = ["ClosedFormConfig", "anchored_patch", "ConceptKeys", "Progress", "SolveDtype", "encode_concepts", "encode_prompts",
           "patch_from_multipliers", "preserve_list", "weight_grams"]

Progress = Callable[[int, int], None]
"""``progress(done, total)``; a node passes one that also checks for interruption."""


class SolveDtype(str, Enum):
    FLOAT64 = "float64"
    FLOAT32 = "float32"

    @property
    def torch(self) -> torch.dtype:
        return torch.float64 if self is SolveDtype.FLOAT64 else torch.float32


@dataclass(frozen=True)
class ClosedFormConfig:
    """Options every closed-form method shares (names match the node inputs)."""

    token_pick: TokenPick = option(
        TokenPick.LAST_WORD_EOT_PADDING,
        "Which token rows of each prompt are edited. 'last word + EOT + padding' (UCE paper) also "
        "maps the end-of-text and padding rows, which carry the concept too, and erases more "
        "thoroughly; 'last subject token' (UCE's current code) edits one row and disturbs "
        "other prompts least.",
    )
    erase_scale: float = option(
        1.0, "Weight of the erase term. Higher erases harder; too high can distort unrelated "
        "prompts. Lower it if images turn to noise.", min=0.0, max=100.0, step=0.05)
    preserve_scale: float = option(
        0.1, "Weight of preserved concepts. Higher keeps preserved concepts closer to the "
        "original; too high weakens the erasure.", min=0.0, max=100.0, step=0.01)
    lamb: float = option(
        5.0, "Ridge term λ that keeps weights near the original in every direction, including those of "
        "prompts no list names. Higher changes the model less overall and moves unlisted prompts less, at "
        "some cost in erasure; the papers use 0.5. Must be above 0 unless the keys span every direction.",
        min=0.0, max=1e4, step=0.01)
    preserve_empty_prompt: bool = option(
        True, "Also preserve the empty prompt, so the unconditional (negative) branch of CFG does "
        "not move. Turn off only to reproduce runs without it.")
    solve_dtype: SolveDtype = option(
        SolveDtype.FLOAT64, "Precision of the solve. float64 is exact and still takes "
        "milliseconds; float32 matches the papers' code.")
    preserve_bank: bool = option(
        True, "Also preserve a built-in bank of everyday prompts and neighbours of the concept's kind, "
        "so prompts in no list keep their images. Costs: the first run per text encoder encodes "
        "about 40 prompts (seconds on a CPU, cached after that), and the target is erased "
        "slightly less where it shares directions with the bank. Turn off to reproduce a paper.")

    def __post_init__(self) -> None:
        validate_ranges(self)


def encode_prompts(encoder: TextEncoder, prompts: Sequence[str], rows: str = "all") -> EncodedText:
    """Encode every distinct prompt once, in one call (the encoder batches); ``rows``: the
    positions the caller reads (``text.encoded.ROWS``; see ``rows_for``)."""
    unique = list(dict.fromkeys(prompts))
    enc = encode(encoder, unique, rows)
    if tuple(enc.texts) != tuple(unique):
        raise ValueError("the text encoder must return its prompts in the order given")
    return enc


@dataclass(frozen=True)
class ConceptKeys:
    """Every prompt a closed-form method needs, encoded once: the erase pairs, the preserve
    prompts and any ``also`` prompts (the null prompt for SPEED's invariants)."""

    enc: EncodedText
    pairs: list[tuple[str, str]]
    keep: list[str]

    def erase(self, pick: TokenPick) -> tuple[torch.Tensor, torch.Tensor]:
        return erase_rows(self.enc, self.pairs, pick)

    def preserve(self, pick: TokenPick, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return preserve_rows(self.enc, self.keep if prompts is None else prompts, pick)

    def rows(self, prompt: str) -> torch.Tensor:
        """All token rows of one encoded prompt, ``[T, d]``."""
        return self.enc.hidden[self.enc.index(prompt)]


def preserve_list(concepts: ConceptSet, *, preserve_empty: bool, bank: bool) -> list[str]:
    """The prompts an edit keeps: the concepts' preserve prompts, the empty prompt if asked, and
    the default bank (``methods/bank.py``) if asked. The check reads the same list."""
    keep = concepts.preserve_prompts([""] if preserve_empty else [])
    return keep + (bank_prompts(concepts, exclude=keep) if bank else [])


def encode_concepts(concepts: ConceptSet, encoder: TextEncoder, sites: Sequence[AttentionSite], *,
                    preserve_empty: bool, also: Sequence[str] = (), rows: str = "all",
                    bank: bool = False) -> ConceptKeys:
    """Encode the concepts' prompts once (checked against the sites' key width); ``rows`` as in
    :func:`encode_prompts`; ``bank`` adds the default preserve bank (:func:`preserve_list`)."""
    pairs = concepts.erase_pairs()
    keep = preserve_list(concepts, preserve_empty=preserve_empty, bank=bank)
    enc = encode_prompts(encoder, [p for pair in pairs for p in pair] + keep + list(also), rows)
    check_context_width(enc, sites)
    return ConceptKeys(enc, pairs, keep)


def check_context_width(enc: EncodedText, sites: Sequence[AttentionSite]) -> None:
    widths = sorted({s.in_features for s in sites})  # one stream per call (methods/streams.py)
    if widths and widths != [enc.width]:
        stream = sites[0].stream
        raise ArchitectureError(
            f"the text encoder must produce the width the model's text layers read "
            f"({widths}{'' if stream == 'tokens' else ', ' + stream + ' vector'}), but it produces "
            f"{enc.width}. Connect the CLIP that came with this checkpoint.",
            input_name="clip",
        )


def default_device(sites: Sequence[AttentionSite]) -> torch.device:
    """Where to solve when the caller names no device: beside the first in-memory weight."""
    tensors = [s.weight for s in sites if isinstance(s.weight, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def weight_grams(sites: Sequence[AttentionSite], device: torch.device | str, dtype: torch.dtype,
                 visit: Callable[[AttentionSite, torch.Tensor], None] | None = None) -> dict[int, torch.Tensor]:
    """``G = Σ_l W_lᵀW_l`` ``[d, d]`` per key width ``d`` of ``sites``, in ``dtype``: the weights of
    one width are stacked a few thousand rows at a time and each stack's Gram is taken from its
    upper blocks (symmetric), so many thin weights cost one large product, not one each.
    ``visit(site, W)``, when given, sees each weight as loaded (on ``device``, in ``dtype``), so a
    caller that needs the weights too does not load them twice."""
    grams: dict[int, torch.Tensor] = {}
    pending: dict[int, list[torch.Tensor]] = {}
    # remembered (``linalg.gram``) only where every stack fits the memo together: SDXL's ~1.3 GiB
    # of K/V stacks would only evict each other and the key Grams
    remember = sum(s.weight.shape[0] * s.weight.shape[1] for s in sites) * dtype.itemsize <= MEMO_BYTES // 2

    def flush(width: int) -> None:
        part = gram(torch.cat(pending.pop(width)), dtype, remember=remember)
        grams[width] = grams[width] + part if width in grams else part

    for site in sites:
        stack = pending.setdefault(site.in_features, [])
        stack.append(site.tensor().to(device, dtype))
        if visit is not None:
            visit(site, stack[-1])
        if sum(len(w) for w in stack) >= GRAM_CHUNK // 2:  # one chunk per stack (a second, thin one is slow)
            flush(site.in_features)
    for width in list(pending):
        flush(width)
    return grams


def patch_from_multipliers(
    sites: Sequence[AttentionSite],
    multiplier_for: Callable[[AttentionSite, torch.Tensor], RightMultiplier],
    meta: dict[str, object],
    method: str,
    progress: Progress | None = None,
    started: float | None = None,
    *,
    one_per_width: bool = False,
) -> PatchSet:
    """``ΔW = (W₀ P) Q`` for every site, stored as low-rank factors on the CPU in float32 (dense
    when the multiplier has full rank).

    ``multiplier_for(site, W₀)`` gives the site's ``P, Q``; sites that share one multiplier (the
    UCE family's one solve per width) share one ``Q`` tensor, so memory grows with the rank.
    ``one_per_width``: every site of a width gets the same multiplier (the caller says so, as the
    first site cannot know); one of rank at least half the width is then stored *deferred*
    (``PatchEntry.deferred``): the weight's snapshot and the shared factors, ``W₀ P`` taken only
    when read (ComfyUI's context transform never reads it). Thinner ones cost little either way.
    """
    entries: dict[str, PatchEntry] = {}
    shared: dict[int, tuple[RightMultiplier, dict[str, object]]] = {}  # keeps each multiplier alive
    uniform = True  # every site of a width got the very same multiplier object
    first_of_width: dict[int, RightMultiplier] = {}  # one per width, not one per site (SPEED's are per site)
    ranks = []
    for i, site in enumerate(sites):
        weight = site.tensor()
        mult = multiplier_for(site, weight)
        uniform = uniform and first_of_width.setdefault(site.in_features, mult) is mult
        if one_per_width and wide(mult.rank, site.in_features):
            owned = isinstance(site.weight, LazyWeight) and site.weight.owned
            entries[site.key] = PatchEntry.deferred(weight.to("cpu", torch.float32, copy=not owned),
                                                    _factor(shared, mult, "P"), _factor(shared, mult, "Q"))
        else:
            up = check_finite(mult.up_for(weight, torch.float32), f"the edit of '{site.key}'", method)
            if mult.full:  # Q = I: the delta W₀P itself, dense
                entries[site.key] = PatchEntry(diff=up.float().cpu())
            else:
                entries[site.key] = PatchEntry(up=up.float().cpu(), down=_factor(shared, mult, "Q"))
        ranks.append(mult.rank)
        if progress is not None:
            progress(i + 1, len(sites))
    info = dict(meta)
    info["sites"] = len(entries)
    info["rank"] = max(ranks, default=0)
    if started is not None:
        info["seconds"] = round(time.perf_counter() - started, 4)
    context = None
    if sites and uniform and all(s.stream == "tokens" for s in sites):
        context = {}
        for width, mult in first_of_width.items():
            context[width] = (_factor(shared, mult, "P").tensor, _factor(shared, mult, "Q"))
    return PatchSet(entries, info, context_multipliers=context)


def _factor(shared: dict[int, tuple[RightMultiplier, dict[str, object]]], mult: RightMultiplier, name: str):
    """``mult``'s ``P`` (a :class:`SharedRight`) or ``Q`` (``None`` when full) on the CPU in float32,
    each made once per multiplier and only when asked (a low-rank entry needs only ``Q``)."""
    made = shared.setdefault(id(mult), (mult, {}))[1]
    if name not in made:
        made[name] = SharedRight(mult.P.float().cpu(), mult.P.device) if name == "P" else (
            None if mult.full else mult.Q.float().cpu())
    return made[name]


def anchored_patch(
    sites: Sequence[AttentionSite],
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    config: ClosedFormConfig,
    method: str,
    meta: dict[str, object],
    *,
    device: torch.device,
    progress: Progress | None,
    started: float,
) -> PatchSet:
    """The UCE-family edit from key rows ``(target, anchor, preserve)``: one anchored solve per key
    width (the shared config's scales, λ and precision), applied to every site as low-rank factors."""
    ce, ca, cp = (r.to(device) for r in rows)
    multipliers = {
        width: anchored_right_multiplier(ce, ca, cp, erase_scale=config.erase_scale,
                                         preserve_scale=config.preserve_scale, lamb=config.lamb,
                                         dtype=config.solve_dtype.torch, method=method)
        for width in sorted({s.in_features for s in sites})
    }
    return patch_from_multipliers(sites, lambda site, _w: multipliers[site.in_features], meta, method,
                                  progress, started, one_per_width=True)


def describe_run(method: str, concepts: ConceptSet, config: ClosedFormConfig) -> dict[str, object]:
    """Metadata shared by every closed-form PatchSet."""

    cfg = {k: (v.value if isinstance(v, Enum) else v) for k, v in vars(config).items()}
    return {"method": method, "concepts": concepts.describe(), "config": cfg,
            "core_version": __version__}
