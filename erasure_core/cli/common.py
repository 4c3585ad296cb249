"""What both subcommands share: progress on stderr, and the K/V check that ends every run with a
line saying whether the erasure worked."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..architectures import AttentionSite
from ..concepts import ConceptSet
from ..edit.patch import PatchSet
from ..text.encoded import EncodedText, TextEncoder, TokenPick, erase_rows, preserve_rows

# A target's K/V within this share of its original distance from the anchor's counts as erased;
# preserved prompts whose K/V move more than DRIFT_WARN are reported as disturbed.
GAP_OK = 0.25
DRIFT_WARN = 0.10


class StderrProgress:
    """``progress(done, total)`` printing ``label: done/total`` to stderr about every tenth of a phase."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream, self.started = label, stream or sys.stderr, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if done == total or total < 10 or done % max(1, total // 10) == 0:
            print(f"{self.label}: {done}/{total} ({time.perf_counter() - self.started:.1f} s)", file=self.stream,
                  flush=True)


class MemoEncoder:
    """An encoder that remembers what it encoded, so the check re-uses the method's encodings."""

    def __init__(self, encoder: TextEncoder):
        self.encoder, self.cache = encoder, {}

    def __call__(self, texts: Sequence[str], **kwargs) -> EncodedText:
        key = (tuple(texts), tuple(sorted(kwargs.items())))
        if key not in self.cache:
            self.cache[key] = self.encoder(texts, **kwargs)
        return self.cache[key]


@dataclass(frozen=True)
class SiteCheck:
    key: str
    relative_change: float
    gap_left: float
    drift: float


@dataclass(frozen=True)
class KVCheck:
    """Over the stacked outputs of every edited K/V site: the share of the target→anchor gap left
    (0 = each target's K/V is its anchor's original K/V) and the preserved prompts' drift
    (``‖ΔW c_p‖ / ‖W₀ c_p‖``; NaN without preserved prompts)."""

    sites: tuple[SiteCheck, ...]
    gap_left: float
    drift: float

    def verdict(self) -> str:
        drift = "no preserved prompts" if self.drift != self.drift else f"preserved prompts' K/V moved {self.drift:.1%}"
        if self.gap_left <= GAP_OK:
            line = (f"result: the erasure WORKED: the targets' K/V are {self.gap_left:.1%} of their original "
                    f"distance from the anchors' (at most {GAP_OK:.0%} counts as erased); {drift}")
            if self.drift == self.drift and self.drift > DRIFT_WARN:
                line += f" (over {DRIFT_WARN:.0%}: raise lamb or preserve_scale to disturb less)"
            return line + "."
        return (f"result: the erasure did NOT work: the targets' K/V are still {self.gap_left:.1%} of their original "
                f"distance from the anchors' (erased means at most {GAP_OK:.0%}); {drift}. Raise erase_scale, lower "
                "lamb, or use token_pick 'last word + EOT + padding'.")


def kv_check(sites: Sequence[AttentionSite], patch: PatchSet, concepts: ConceptSet, encoder: TextEncoder,
             pick: TokenPick) -> KVCheck:
    pairs, keep = concepts.erase_pairs(), concepts.preserve_prompts()
    enc = encoder(list(dict.fromkeys([p for pair in pairs for p in pair] + keep)))
    ce, ca = (r.double().cpu() for r in erase_rows(enc, pairs, pick))  # encodings may be on --device
    cp = preserve_rows(enc, keep, pick).double().cpu()
    rows, sums = [], torch.zeros(4, dtype=torch.float64)
    for site in sites:
        if site.key not in patch:
            continue
        w0 = site.tensor().double().cpu()
        dw = patch[site.key].dense().double()
        before, after = w0 @ (ce - ca).T, (w0 + dw) @ ce.T - w0 @ ca.T
        moved, size = dw @ cp.T, w0 @ cp.T
        parts = torch.stack([before.pow(2).sum(), after.pow(2).sum(), moved.pow(2).sum(), size.pow(2).sum()])
        sums += parts
        rows.append(SiteCheck(site.key, float(dw.norm() / w0.norm()), float((parts[1] / parts[0]).sqrt()),
                              float((parts[2] / parts[3]).sqrt()) if len(cp) else float("nan")))
    gap = float((sums[1] / sums[0]).sqrt()) if sums[0] > 0 else float("nan")
    drift = float((sums[2] / sums[3]).sqrt()) if len(cp) and sums[3] > 0 else float("nan")
    return KVCheck(tuple(rows), gap, drift)
