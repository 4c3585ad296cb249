"""SPEED: Scalable, Precise, Efficient concept Erasure (Li et al., ICLR 2026, arXiv 2503.07392).

Edits (by default) only the cross-attention V projections so that target keys produce their
anchor's values, with the update confined to the null space of the retained keys:

    ΔW = W (AᵀC₁ − C₁ᵀC₁) · P · Q · M,   M = (C₁ᵀC₁ P + α I)⁻¹,
    Q = I − M K₂ (K₂ᵀ P M K₂ + λ I₄)⁻¹ K₂ᵀ P,

where ``C₁, A`` are target / anchor key rows (statistics *averaged* over concepts, as the
reference ``train_erase_null.py`` does, so the erase strength does not grow with their number),
``P`` projects onto eigenvectors of the retain covariance below ``threshold`` (null space),
``K₂`` holds the invariants (IEC): the null prompt's start row and 3 k-means centres of its
end/padding rows, so ``ΔW K₂ = 0`` exactly when λ = 0. The retain set is refined per layer by
influence-based prior filtering (IPF: keep retain keys the plain erase moves more than average)
and directed prior augmentation (DPA: perturb kept keys along W's least-amplified direction and
keep the perturbations the erase moves more than average).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..architectures import AttentionSite
from ..concepts import ConceptSet
from ..config import option
from ..edit.linalg import (
    RightMultiplier,
    check_finite,
    compact,
    full_multiplier,
    kmeans,
    low_eigen_projector_of_rows,
)
from ..edit.patch import PatchSet
from ..errors import ConceptError, ConfigError, NumericalError
from ..text.encoded import EncodedText, TextEncoder, TokenPick, rows_for
from . import register
from .closed_form import (
    ClosedFormConfig,
    Progress,
    default_device,
    describe_run,
    encode_concepts,
    encode_prompts,
    patch_from_multipliers,
)
from .speed_priors import PriorBank, prior_bank, refined_projector

__all__ = ["Projections", "SPEEDConfig", "solve"]


class Projections(str, Enum):
    V = "V"
    K = "K"
    KV = "KV"

    def edits(self, key: str) -> bool:
        if not key.endswith(("to_k.weight", "to_v.weight")):
            return True  # a DiT's text projection feeds K and V alike: always edited
        return (self is not Projections.K and key.endswith("to_v.weight")) or \
            (self is not Projections.V and key.endswith("to_k.weight"))


@dataclass(frozen=True)
class SPEEDConfig(ClosedFormConfig):
    """SPEED's options. The defaults erase the exact target (issue #13): the target's last word,
    end-of-text and padding rows on K and V, the preserve bank kept through every row those keys
    cover, one null-space projector (no per-layer filtering or augmentation). With the paper's
    few-concept setting (preset ``few-concept``: last subject token, V only, ``aug_num`` 10, no
    bank) the padding rows, which carry the concept too, keep it: a full-size SD1.5 test left 88%
    of the cat–dog gap.

    ``preserve_scale`` is SPEED's ``retain_scale`` α and ``lamb`` its IEC ridge λ.
    ``erase_scale`` multiplies the final update (1 = the paper's).
    """

    token_pick: TokenPick = option(
        TokenPick.LAST_WORD_EOT_PADDING, "Which token rows are keys. The default also maps the "
        "end-of-text and padding rows, which carry the concept (the last subject token alone leaves "
        "most of it); the paper uses the last subject token, its nudity setting all tokens.")
    preserve_scale: float = option(
        1.0, "Retain scale α: the ridge of M = (C₁ᵀC₁P + αI)⁻¹. Lower erases harder inside the null "
        "space (0.05 for many celebrities).", min=1e-6, max=100.0, step=0.01)
    lamb: float = option(
        0.0, "IEC ridge λ: 0 keeps the null prompt's invariant rows exactly unchanged; the nudity "
        "setting uses 0.5.", min=0.0, max=1e4, step=0.01)
    preserve_empty_prompt: bool = option(
        False, "Also use the empty prompt as a retain prompt (SPEED keeps it through IEC instead).")
    projections: Projections = option(
        Projections.KV, "Which projections to edit: both (default: with V alone the attention still "
        "looks where the concept would), V (the paper's), or K.")
    threshold: float = option(
        0.1, "Eigenvalue threshold of the retain covariance: directions below it form the null space "
        "the edit may use. Lower protects more (1e-4 for many celebrities).", min=0.0, max=100.0, step=1e-4)
    aug_num: int = option(
        0, "Directed prior augmentation: perturbed copies per kept retain key (0, the default, turns "
        "filtering and augmentation off: one projector for all layers; with the bank's every-row "
        "retain set the paper's 10 costs minutes per edit on a CPU). The paper uses 10.", min=0, max=100)
    disable_filter: bool = option(
        False, "Skip influence-based filtering: augment every retain key, not only the most influenced "
        "(the paper does this for celebrity sets, whose retain set does not reach rank saturation).")
    random_seed: int = option(0, "Seed of the augmentation noise and the k-means of the invariants (fixed, so the "
                                 "edit is reproducible).", min=0, max=2**31 - 1)


_PAPER = {"token_pick": TokenPick.LAST_SUBJECT, "projections": Projections.V, "aug_num": 10, "threshold": 0.1,
          "preserve_scale": 1.0, "lamb": 0.0, "disable_filter": False, "preserve_bank": False}
PRESETS: dict[str, dict[str, object]] = {
    "few-concept": _PAPER,
    "multi-celebrity": _PAPER | {"threshold": 1e-4, "preserve_scale": 0.05, "disable_filter": True},
    "nudity": _PAPER | {"token_pick": TokenPick.ALL, "preserve_scale": 0.7, "lamb": 0.5},
}


def _mean_stats(ce: torch.Tensor, ca: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``C₁ᵀC₁`` and ``(A − C₁)`` averaged over the ``n`` concepts (not summed)."""
    return ce.T @ ce / n, (ca - ce) / n


def _retain_prompts(keep: Sequence[str], concepts: ConceptSet) -> list[str]:
    """Retain prompts that do not name a target as a whole word (as the reference drops them)."""
    names = [re.escape(n) for t in concepts.targets for n in t.names]
    pattern = re.compile(r"\b(" + "|".join(names) + r")\b", re.IGNORECASE) if names else None
    return [p for p in keep if not (pattern and pattern.search(p))]


def _invariants(null_rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``K₂ [d, 4]``: the null prompt's start row and 3 k-means centres of its other rows (fewer when
    it has fewer distinct rows: a pooled vector is one row; a causal LLM with masked padding, such as
    HiDream's Llama, repeats one padding row, whose copies would make K₂ singular)."""
    rest = null_rows[1:]
    distinct, inverse = torch.unique(rest, dim=0, return_inverse=True)
    if len(distinct) < len(rest):  # keep each row's first copy, in order (k-means' seeded start is unchanged)
        first = torch.full((len(distinct),), len(rest), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(len(rest)), "amin")
        rest = rest[first.sort().values]
    if len(rest) == 0:
        return null_rows[:1].T
    return torch.cat([null_rows[:1], kmeans(rest, min(3, len(rest)), generator)]).T


@torch.no_grad()
def _site_multiplier(w: torch.Tensor, stats: dict[str, torch.Tensor], config: SPEEDConfig,
                     generator: torch.Generator, bank: PriorBank | None,
                     shared_p: torch.Tensor | None) -> RightMultiplier:
    """One layer's ``P_f Q_f`` with ``ΔW = W P_f Q_f`` (legend: module docstring)."""
    c1tc1, diff, ce, k2, cross = (stats[k] for k in ("c1tc1", "diff", "ce", "k2", "cross"))
    d = c1tc1.shape[0]
    eye = torch.eye(d, dtype=c1tc1.dtype, device=c1tc1.device)
    big = None
    if bank is not None:
        proj, big = refined_projector(bank, w, aug_num=config.aug_num, disable_filter=config.disable_filter,
                                      threshold=config.threshold, generator=generator)
    else:
        proj = shared_p
    # C₁ᵀC₁ P, with P = I − U Uᵀ when U is known (thin: no d × d × d product)
    c1p = c1tc1 - (c1tc1 @ big) @ big.T if big is not None else c1tc1 @ proj
    m_inv = c1p + config.preserve_scale * eye  # M⁻¹, factored once for both solves
    lu, pivots = torch.linalg.lu_factor(m_inv)
    mk2 = torch.linalg.lu_solve(lu, pivots, k2)  # M K₂
    k2p = k2.T @ proj
    inner = k2p @ mk2 + config.lamb * torch.eye(k2.shape[1], dtype=k2.dtype, device=k2.device)
    solved, info = torch.linalg.solve_ex(inner, k2p)
    if int(info) != 0:
        blame = "lamb" if config.lamb <= 0 else "solve_dtype"
        raise NumericalError(
            f"SPEED: the invariant system K₂ᵀPMK₂ + λI must be non-singular, but it is singular at lamb="
            f"{config.lamb} (the null prompt's invariant rows lie outside the null space, or coincide). "
            + ("Set 'lamb' above 0 (the nudity preset uses 0.5)." if blame == "lamb" else
               "Use solve_dtype float64."), input_name=blame)

    def times_q(b: torch.Tensor) -> torch.Tensor:  # b Q = b − (b M K₂) solved
        return b - (b @ mk2) @ solved

    def times_m(b: torch.Tensor) -> torch.Tensor:  # b M = (M⁻ᵀ bᵀ)ᵀ
        return torch.linalg.lu_solve(lu, pivots, b.T, adjoint=True).T

    if len(ce) > d:  # more target rows than the width: (AᵀC₁ − C₁ᵀC₁) P Q M as one d × d matrix
        m = config.erase_scale * times_m(times_q(cross @ proj))
        return full_multiplier(check_finite(m, "the null-space edit", "SPEED"))
    down = times_m(times_q(ce @ proj))  # C₁ P Q M: [R, d]
    return compact(config.erase_scale * diff.T, check_finite(down, "the null-space factor", "SPEED"))


@torch.no_grad()
def solve(
    sites: Sequence[AttentionSite],
    concepts: ConceptSet,
    encoder: TextEncoder,
    config: SPEEDConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> PatchSet:
    """Erase ``concepts`` with SPEED; only the sites ``config.projections`` selects are edited."""
    config = config or SPEEDConfig()
    started = time.perf_counter()
    edited = [s for s in sites if config.projections.edits(s.key)]
    if not edited:
        raise ConfigError(f"projections {config.projections.value} must select K/V sites, but none of "
                          f"the {len(sites)} sites match.", input_name="projections")
    # Targets and priors are read at single rows up to their EOT (all rows in the nudity setting and
    # with the default multi-row pick); only the null prompt's invariants read every row, so it alone
    # is encoded at full length.
    rows = rows_for(config.token_pick)
    keys = encode_concepts(concepts, encoder, edited, preserve_empty=config.preserve_empty_prompt,
                           also=("",) if rows == "all" else (), rows=rows, bank=config.preserve_bank)
    null = keys.enc if rows == "all" else encode_prompts(encoder, [""], "all")
    device = torch.device(device) if device is not None else default_device(sites)
    dtype = config.solve_dtype.torch
    ce, ca = (t.to(device, dtype) for t in keys.erase(config.token_pick))
    start = _start_rows(keys.enc)
    if config.token_pick is TokenPick.ALL and start:  # the reference's all-token keys are rows 1..76: no start row
        length = keys.enc.hidden.shape[1]
        body = torch.arange(len(ce), device=device) % length != 0
        ce, ca = ce[body], ca[body]
    retain_prompts = _retain_prompts(keys.keep, concepts)
    null_rows = null.hidden[null.index("")].to(device, dtype)
    null_rows = null_rows[null_rows.abs().amax(-1) > 0]  # DiT encoders pad short prompts with zero rows: absent
    # retain keys are last-subject rows (also in the all-token nudity setting), or, with no retain
    # set, the null prompt's non-start rows, as in the reference. With the bank and multi-row target
    # keys, the retain prompts keep every row the targets' keys cover (their EOT and padding rows
    # too), so the null space excludes what unrelated prompts share with the target's padding.
    retain_pick = config.token_pick if config.preserve_bank and config.token_pick is not TokenPick.LAST_SUBJECT \
        else TokenPick.LAST_SUBJECT
    retain = keys.preserve(retain_pick, retain_prompts).to(device, dtype) if retain_prompts \
        else null_rows[start:]
    if len(ce) == 0:
        raise ConceptError("SPEED needs target rows, but the token strategy selected none.",
                           input_name="concepts")
    generator = torch.Generator().manual_seed(config.random_seed)
    c1tc1, diff = _mean_stats(ce, ca, len(keys.pairs))
    cross = diff.T @ ce  # AᵀC₁ − C₁ᵀC₁ (averaged), d × d
    stats = {"c1tc1": c1tc1, "diff": diff, "ce": ce, "cross": cross,
             "k2": _invariants(null_rows.cpu(), generator).to(device, dtype)}
    shared_p, bank = None, None
    if config.aug_num == 0:  # no per-layer refinement (the reference skips IPF too): one projector
        shared_p = low_eigen_projector_of_rows(retain, config.threshold)
    else:
        bank = prior_bank(retain, c1tc1, ce, diff, config.threshold)
    shared: dict[int, RightMultiplier] = {}

    def multiplier_for(site: AttentionSite, weight: torch.Tensor) -> RightMultiplier:
        if shared_p is not None:
            if site.in_features not in shared:
                shared[site.in_features] = _site_multiplier(weight, stats, config, generator, None, shared_p)
            return shared[site.in_features]
        return _site_multiplier(weight.to(device, dtype), stats, config, generator, bank, None)

    meta = describe_run("speed", concepts, config)
    return patch_from_multipliers(edited, multiplier_for, meta, "SPEED", progress, started)


def _start_rows(enc: EncodedText) -> int:
    """1 when row 0 is a start token (CLIP's: the same id in every prompt, the empty one included),
    else 0 (T5 and LLM rows begin with the words; a pooled vector is its only row)."""
    ids = enc.token_ids
    if ids is None or enc.hidden.shape[1] < 2:
        return int(enc.hidden.shape[1] > 1)
    first = ids[:, 0]
    return int(bool((first >= 0).all() and (first == first[0]).all()))


register("speed", SPEEDConfig, solve,
         "SPEED (arXiv 2503.07392): null-space constrained V edit with prior filtering and augmentation.",
         presets=PRESETS, node_widgets=False)
