"""What an edit did, measured in K/V space on encoded prompts (issue #12 item 3, issue #13).

Every K/V site ``l`` of the model reads the same token rows. For a prompt with rows ``X [T, d]``
(all ``T`` positions: the UNet attends to every one) the edit moves the site's output by
``X ΔW_lᵀ``. Summed over sites, with ``G_WW = Σ W_lᵀW_l``, ``G_WΔ = Σ W_lᵀΔW_l`` and
``G_ΔΔ = Σ ΔW_lᵀΔW_l`` (``d × d``, taken once):

* the *gap* of a target ``e`` with anchor ``a`` is ``‖(X_e − X_a) Wᵀ‖`` (Frobenius over rows and
  sites): how far the original model's target is from its anchor;
* the *share of the gap left* is ``‖X_e W'ᵀ − X_a Wᵀ‖ / gap`` with ``W' = W + ΔW``: 0 means the
  target now reads exactly as the anchor did, 1 that nothing changed;
* the *drift* of any other prompt ``p`` is ``‖X_p ΔWᵀ‖ / gap`` with the root-mean-square gap of
  the targets: 0 is untouched, 1 means it moved as far as a target is from its anchor.

Preserved prompts are the ones the edit was asked to keep; probes (``methods/bank.py``) are
built-in prompts that were in no list, so their drift is the collateral damage a user would not
otherwise see. The same ratios in latent space are what the real-ComfyUI tests measure.

A DiT with several token streams (HiDream: T5 and one Llama layer per projection) has one such K/V
space per stream, each with its own rows; the squared distances are summed over the streams as over
the sites. Pooled inputs are not measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..architectures import AttentionSite, sites_by_stream
from ..concepts import ConceptSet
from ..edit.linalg import wide
from ..edit.patch import PatchSet
from ..text.encoded import EncodedText, TextEncoder
from .bank import probe_prompts
from .closed_form import encode_prompts, weight_grams
from .streams import StreamView

__all__ = ["Check", "MAX_PROMPTS", "check_edit"]

MAX_PROMPTS = 16  # per group: the check costs rows × d², so very long lists are sampled evenly


@dataclass(frozen=True)
class Check:
    """The check's numbers: ``(prompt, value)`` per target (share of gap left), per preserved
    prompt and per probe (drift, in units of the targets' gap); ``gap`` is that unit."""

    targets: tuple[tuple[str, float], ...]
    preserved: tuple[tuple[str, float], ...]
    probes: tuple[tuple[str, float], ...]
    gap: float
    counts: tuple[int, int, int] = (0, 0, 0)  # prompts in each group before sampling

    @staticmethod
    def _worst(items: Sequence[tuple[str, float]]) -> float:
        return max((v for _, v in items), default=float("nan"))

    @property
    def worst_target(self) -> float:
        return self._worst(self.targets)

    @property
    def worst_preserved(self) -> float:
        return self._worst(self.preserved)

    @property
    def worst_probe(self) -> float:
        return self._worst(self.probes)

    def summary(self) -> str:
        def part(name: str, items: Sequence[tuple[str, float]], count: int) -> str:
            if not items:
                return f"{name}: none"
            mean = sum(v for _, v in items) / len(items)
            sampled = f" of {count}" if count > len(items) else ""
            return f"{name} ({len(items)}{sampled}): worst {self._worst(items):.3f}, mean {mean:.3f}"

        return ("check (K/V space; 0 is best): " + part("gap left on targets", self.targets, self.counts[0])
                + "; " + part("drift of preserved", self.preserved, self.counts[1])
                + "; " + part("drift of held-out probes", self.probes, self.counts[2]))

    def lines(self, first: int = 3) -> list[str]:
        """The summary, then the worst few of each group, for the report."""
        out = [self.summary()]
        for name, items in (("target", self.targets), ("preserved", self.preserved), ("probe", self.probes)):
            for prompt, value in sorted(items, key=lambda kv: -kv[1])[:first]:
                out.append(f"  {name} '{prompt or '(empty prompt)'}': {value:.3f}")
        return out


def _sampled(prompts: Sequence[str], limit: int) -> list[str]:
    if len(prompts) <= limit:
        return list(prompts)
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


def _up(entry, strength: float, device: torch.device | str) -> torch.Tensor:
    """``ΔW = up @ down`` at ``strength``: a low-rank entry's ``up``, or a dense entry itself (``down = I``)."""
    return (entry.up if entry.is_low_rank else entry.diff).to(device).float() * strength


@dataclass(frozen=True)
class _ByDown:
    """``G_WΔ = Σ_k A_k D_k`` and ``G_ΔΔ = Σ_k D_kᵀ C_k D_k`` kept per shared ``down`` factor
    ``D_k [r, d]`` (the UCE family's sites of one width share one; dense entries form one term
    with ``D = I``, stored as ``None``): ``A_k = Σ_l Lᵀ up_l``
    (``[rows, r]``, ``L = W_lᵀ`` or its projection), ``C_k = Σ_l up_lᵀ up_l`` (``[r, r]``), all
    float64. Products with prompt rows then cost ``rows × d × r`` instead of ``rows × d²``."""

    terms: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]  # (D_k, A_k, C_k)
    rows: int
    d: int

    def wd(self) -> torch.Tensor:
        out = torch.zeros(self.rows, self.d, dtype=torch.float64)
        for down, a, _ in self.terms:
            out = out.to(a.device) + (a if down is None else a @ down)
        return out

    def dd(self) -> torch.Tensor:
        out = torch.zeros(self.d, self.d, dtype=torch.float64)
        for down, _, c in self.terms:
            out = out.to(c.device) + (c if down is None else down.T @ c @ down)
        return out

    def dense_if_wide(self) -> _ByDown:
        """One dense term (``D = I``) when the factors are not thinner than half the width: then
        the factored products would cost more than the dense ones."""
        if len(self.terms) < 2 and all(down is None for down, _, _ in self.terms):
            return self  # nothing, or one dense term already
        if not wide(sum(self.d if down is None else down.shape[0] for down, _, _ in self.terms), self.d):
            return self
        return _ByDown(((None, self.wd(), self.dd()),), self.rows, self.d)  # type: ignore[arg-type]

    def moved(self, x: torch.Tensor) -> torch.Tensor:
        """``‖x ΔW_lᵀ‖²`` summed over sites, per row of ``x [m, d]``: the rows of ``X G_ΔΔ Xᵀ``'s
        diagonal, in ``x``'s precision (a sum of squares: float32 suffices where nothing cancels)."""
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for down, _, c in self.terms:
            y = x if down is None else x @ down.T.to(x.dtype)
            total += ((y @ c.to(x.dtype)) * y).sum(-1).double()
        return total

    def cross(self, left: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Per row, ``left G_WΔ xᵀ``'s diagonal for rows ``left [m, d]`` paired with ``x [m, d]``;
        with projected Grams (``A`` taken against the gap rows) ``left`` is ``None``: ``A``'s rows
        are those rows."""
        total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for down, a, _ in self.terms:
            total += ((a if left is None else left @ a) * (x if down is None else x @ down.T)).sum(-1)
        return total


def _shared_edit(sites: Sequence[AttentionSite], patch: PatchSet, strength: float,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(G, E)`` in float32 when every site got ``ΔW_l = W_l E`` from the one multiplier of its width
    (the UCE family, ``patch.context_multipliers``: ``E = strength · P Q``) and the edit is at least
    half the width; ``G = Σ W_lᵀW_l``. Every quantity of the check is then ``tr(Z G Zᵀ)`` for rows
    ``Z``: one Gram of the weights replaces every per-site product. ``None`` otherwise (a thin edit:
    the per-site products with its factors cost less than ``G``)."""
    context = patch.context_multipliers
    widths = {s.in_features for s in sites}
    if not context or len(widths) != 1 or any(s.key not in patch.entries for s in sites):
        return None
    d = next(iter(widths))
    if d not in context or (context[d][1] is not None and not wide(context[d][1].shape[0], d)):
        return None
    p, q = (None if t is None else t.to(device, torch.float64) for t in context[d])
    e = (p if q is None else p @ q) * strength
    return weight_grams(sites, device, torch.float32)[d], e.float()


def _edit_grams(sites: Sequence[AttentionSite], patch: PatchSet, strength: float, device: torch.device | str,
                gap_rows: torch.Tensor | None) -> tuple[torch.Tensor, _ByDown, bool]:
    """``(G_WW or its projection, the edit's Grams by shared down factor, projected?)``, summed over
    ``sites``, which read one token stream (an unedited site adds to ``G_WW`` only).

    ``G_WW = Σ WᵀW`` costs ``Σ d_out·d²``; it is only ever read as ``D G_WW Dᵀ`` and ``D G_WΔ Xᵀ``
    for the gap rows ``D``. When ``gap_rows [n, d]`` are given with ``n < d``, ``G_WW`` comes
    projected, ``[n, n]`` ``Σ (D Wᵀ)(D Wᵀ)ᵀ``, and the edit's ``A_k`` are taken against those rows
    (``Σ d_out·d·n`` work instead)."""
    projected = gap_rows is not None and len(gap_rows) < gap_rows.shape[1]
    d = sites[0].in_features if sites else 0
    terms: dict[int, list] = {}

    def add_edit(site: AttentionSite, wd_left: torch.Tensor) -> None:  # an edited site's A_k and C_k
        entry = patch.entries.get(site.key)
        if entry is None:
            return  # an unedited site adds to G_WW only
        key = id(entry.down) if entry.is_low_rank else 0  # dense entries: one term, D = I
        up = _up(entry, strength, device)
        if key not in terms:  # the shared down factor, converted once
            terms[key] = [entry.down.to(device).double() if entry.is_low_rank else None, 0, 0]
        slot = terms[key]
        slot[1] = slot[1] + (wd_left @ up).double()
        slot[2] = slot[2] + (up.T @ up).double()

    g_ww = None
    if projected:
        rows = gap_rows.to(device, torch.float32)
        for site in sites:
            y = rows @ site.tensor().to(device, torch.float32).T  # [n, d_out]
            g_ww = (y @ y.T).double() if g_ww is None else g_ww + (y @ y.T).double()
            add_edit(site, y)
    elif sites:  # each weight loaded once, for G_WW and for its edit's Grams
        g_ww = weight_grams(sites, device, torch.float32, visit=lambda site, w: add_edit(site, w.T))[d].double()
    rows = len(gap_rows) if projected else d
    if g_ww is None:
        g_ww = torch.zeros(rows, rows, dtype=torch.float64, device=device)
    return g_ww, _ByDown(tuple((dn, a, c) for dn, a, c in terms.values()), rows, d), projected


ROW_CHUNK = 8192  # prompt rows per batched product: bounded memory for a DiT's 512 × 4096 T5 rows


def _per_prompt(value: Callable[[torch.Tensor], torch.Tensor], *blocks: torch.Tensor) -> torch.Tensor:
    """``value(rows…)`` (one number per row) summed per prompt, for prompt blocks ``[n, T, d]``
    taken a few thousand rows at a time: one product per chunk, not one per prompt."""
    n, t = blocks[0].shape[:2]
    step = max(1, ROW_CHUNK // max(t, 1))
    out = [value(*(b[i : i + step].reshape(-1, b.shape[-1]) for b in blocks)).reshape(-1, t).sum(1)
           for i in range(0, n, step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _token_streams(sites: Sequence[AttentionSite]) -> dict[str, list[AttentionSite]]:
    """The sites that read token rows, by stream (``tokens``; a per-layer stream such as ``llama:k``)."""
    groups = sites_by_stream(sites)
    if not groups:
        raise ValueError("the check needs token-stream sites")
    return groups


def _measure(sites: Sequence[AttentionSite], patch: PatchSet, strength: float, enc: EncodedText,
             pairs: Sequence[tuple[str, str]], prompts: Sequence[str],
             device: torch.device | str) -> tuple[list[float], list[float], dict[str, float]]:
    """One stream's squared terms: per target ``‖D Wᵀ‖²`` and ``‖X_e W'ᵀ − X_a Wᵀ‖²``, per other prompt
    ``‖X ΔWᵀ‖²`` (legend: module docstring). Every prompt has the same ``T`` rows (padded with zero
    rows, which add nothing), so each quantity is one batched product over all prompts."""

    def block(texts: Sequence[str], dtype: torch.dtype = torch.float64) -> torch.Tensor:  # [n, T, d]
        return enc.hidden[[enc.index(t) for t in texts]].to(device, dtype)

    shared = _shared_edit(sites, patch, strength, device)
    if shared is not None:
        # every term a sum of squares tr(Z G Zᵀ): the target's residual R = D + X_e Eᵀ is formed
        # first, so nothing cancels in the quadratic form and float32 suffices
        g, e = shared

        def quad(z: torch.Tensor) -> torch.Tensor:
            return ((z @ g) * z).sum(-1).double()

        x_e32 = block([t for t, _ in pairs], torch.float32)
        d32 = x_e32 - block([a for _, a in pairs], torch.float32)
        gap2 = _per_prompt(quad, d32)
        after2 = _per_prompt(lambda dz, x: quad(dz + x @ e.T), d32, x_e32)
        moved = _per_prompt(lambda x: quad(x @ e.T), block(prompts, torch.float32))
        return gap2.tolist(), after2.tolist(), dict(zip(prompts, moved.tolist(), strict=True))
    x_e = block([t for t, _ in pairs])
    diff = x_e - block([a for _, a in pairs])
    g_ww, by_down, projected = _edit_grams(sites, patch, strength, device, diff.reshape(-1, enc.width))
    by_down = by_down.dense_if_wide()
    if projected:  # Grams already taken against the stacked D rows
        per_target = x_e.shape[:2]
        gap2 = g_ww.diagonal().reshape(per_target).sum(1)
        cross = by_down.cross(None, x_e.reshape(-1, enc.width)).reshape(per_target).sum(1)
    else:
        gap2 = _per_prompt(lambda d: ((d @ g_ww) * d).sum(-1), diff)
        cross = _per_prompt(by_down.cross, diff, x_e)
    # ‖X_e W'ᵀ − X_a Wᵀ‖² = ‖D Wᵀ + X_e ΔWᵀ‖² with D = X_e − X_a: the terms nearly cancel, so float64
    after2 = gap2 + 2 * cross + _per_prompt(by_down.moved, x_e)
    moved = _per_prompt(by_down.moved, block(prompts, torch.float32))
    return gap2.tolist(), after2.tolist(), dict(zip(prompts, moved.tolist(), strict=True))


@torch.no_grad()
def check_edit(
    sites: Sequence[AttentionSite],
    patch: PatchSet,
    concepts: ConceptSet,
    encoder: TextEncoder,
    preserved: Sequence[str],
    *,
    strength: float = 1.0,
    probes: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    limit: int = MAX_PROMPTS,
) -> Check:
    """Measure ``patch`` (applied at ``strength``) on the targets, the ``preserved`` prompts and
    held-out probes (the built-in ones for ``concepts`` unless given). Prompts come from
    ``encoder``: pass the cached encoder the edit used, so they are not encoded twice."""
    pairs = _sampled(concepts.erase_pairs(), limit)
    keep = _sampled(list(dict.fromkeys(preserved)), limit)
    all_probes = list(probes) if probes is not None else probe_prompts(concepts, preserved)
    held = _sampled(all_probes, limit)
    prompts = [p for pair in pairs for p in pair] + keep + held
    enc = encode_prompts(encoder, prompts)
    gaps = [0.0] * len(pairs)
    afters = [0.0] * len(pairs)
    moved: dict[str, float] = dict.fromkeys(keep + held, 0.0)
    # one K/V space per token stream (HiDream: T5 and each Llama layer its projections read), summed
    for stream, group in _token_streams(sites).items():
        view = enc if stream == "tokens" else StreamView(lambda texts: enc, stream)(prompts)
        g, a, m = _measure(group, patch, strength, view, pairs, moved, device)
        gaps = [x + y for x, y in zip(gaps, g, strict=True)]
        afters = [x + y for x, y in zip(afters, a, strict=True)]
        moved = {p: moved[p] + m[p] for p in moved}
    left = [math.sqrt(max(after2, 0.0) / gap2) if gap2 > 0 else float("nan")
            for gap2, after2 in zip(gaps, afters, strict=True)]
    unit = math.sqrt(sum(gaps) / len(gaps)) if gaps else float("nan")

    def drift(prompt: str) -> float:
        return math.sqrt(max(moved[prompt], 0.0)) / unit if unit > 0 else float("nan")

    return Check(targets=tuple((t, v) for (t, _), v in zip(pairs, left, strict=True)),
                 preserved=tuple((p, drift(p)) for p in keep),
                 probes=tuple((p, drift(p)) for p in held),
                 gap=unit,
                 counts=(len(concepts.erase_pairs()), len(dict.fromkeys(preserved)), len(all_probes)))
