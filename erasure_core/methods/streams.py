"""One method, several text streams: DiTs read text in more than one place (Flux's ``txt_in`` reads T5
tokens, its ``vector_in`` the pooled CLIP-L vector; Qwen-Image's ``txt_in`` reads RMS-normed rows;
HiDream's ``caption_projection.i`` each read one layer of Llama's per-layer states).

Sites are grouped by what they read (:attr:`AttentionSite.reads`); each group is solved by the
method as it is, with an encoder *view* whose rows are that group's keys: the pooled vector as a
one-row prompt, one layer of a second encoder's per-layer states (with that encoder's own token
rows and end-of-text), or every token row passed through the group's per-row transform. So every
registered method runs unchanged on every family, and the keys are what each layer really reads.
A UNet (one stream, no transform) is solved exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..architectures import AttentionSite, RowTransform, parse_layer_stream
from ..concepts import ConceptSet
from ..edit.patch import PatchSet
from ..errors import ArchitectureError
from ..text.encoded import EncodedText, TextEncoder

__all__ = ["StreamView", "solve_by_stream"]


class _Memo:
    """Encodes each distinct prompt list once per erasure, whatever the number of streams."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.done: dict[tuple[str, ...], EncodedText] = {}

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        key = tuple(texts)
        if key not in self.done:
            self.done[key] = self.encoder(list(texts))
        return self.done[key]


class StreamView:
    """The encoder seen from one group of sites: ``tokens`` rows (through ``transform``), the
    ``pooled`` vector as a prompt of one row (every token pick then picks that row), or layer ``k``
    of the per-layer states ``source`` (stream ``"source:k"``, ``EncodedText.layered``)."""

    def __init__(self, encoder: TextEncoder, stream: str, transform: RowTransform | None = None):
        self.encoder, self.stream, self.transform = encoder, stream, transform

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        enc = self.encoder(texts)
        if self.stream == "pooled":
            if enc.pooled is None:
                raise ArchitectureError(
                    "the model reads a pooled text vector (Flux's vector_in, SD3's y_embedder), but the text "
                    "encoder returns none. Connect the CLIP loaded for this model (with its CLIP-L).",
                    input_name="clip")
            n = len(enc.texts)
            return EncodedText(enc.texts, enc.pooled.float()[:, None, :], torch.zeros(n, dtype=torch.long),
                               token_ids=torch.zeros(n, 1, dtype=torch.long))
        layer = parse_layer_stream(self.stream)
        if layer is not None:
            enc = self._layer(enc, *layer)
        elif self.stream != "tokens":
            raise ArchitectureError(f"the pack knows the text streams 'tokens', 'pooled' and '<encoder>:<layer>', "
                                    f"but a site reads '{self.stream}'.", input_name="model")
        if self.transform is None:
            return enc
        return EncodedText(enc.texts, self.transform(enc.hidden), enc.eot_index, enc.pooled, enc.token_ids)

    @staticmethod
    def _layer(enc: EncodedText, source: str, k: int) -> EncodedText:
        states = enc.layered.get(source)
        if states is None:
            raise ArchitectureError(
                f"the model reads layer {k} of the '{source}' text encoder's per-layer states (HiDream's Llama), but "
                f"the text encoder returns {sorted(enc.layered) or 'none'}. Connect the CLIP loaded for this model "
                f"(with its {source}).", input_name="clip")
        if not 0 <= k < states.layers:
            raise ArchitectureError(
                f"the model reads layer {k} of '{source}', but the text encoder returns {states.layers} layers. "
                "Connect the text encoder this model was made for.", input_name="clip")
        return states.layer(enc.texts, k)


def solve_by_stream(solve: Callable[..., PatchSet], sites: Sequence[AttentionSite], concepts: ConceptSet,
                    encoder: TextEncoder, config: Any, **kwargs: Any) -> PatchSet:
    """``solve`` once per group of sites that read the same keys; the PatchSets joined (disjoint keys).

    ``meta`` is the first group's, with ``sites`` summed, ``rank`` and ``seconds`` combined and
    ``streams`` listing each group (what it reads, its sites and rank).
    """
    groups: dict[tuple[str, str], list[AttentionSite]] = {}
    for site in sites:
        groups.setdefault(site.reads, []).append(site)
    if list(groups) in ([], [("tokens", "")]):
        return solve(sites, concepts, encoder, config, **kwargs)
    memo = _Memo(encoder)
    parts = []
    for (stream, _), group in groups.items():
        view = StreamView(memo, stream, group[0].transform)
        parts.append(((stream, group[0].transform), solve(group, concepts, view, config, **kwargs)))
    entries = {k: e for _, part in parts for k, e in part.entries.items()}
    meta = dict(parts[0][1].meta)
    meta["sites"] = sum(int(p.meta.get("sites", len(p.entries))) for _, p in parts)
    meta["rank"] = max(int(p.meta.get("rank", 0)) for _, p in parts)
    if all("seconds" in p.meta for _, p in parts):
        meta["seconds"] = round(sum(float(p.meta["seconds"]) for _, p in parts), 4)  # type: ignore[arg-type]
    meta["streams"] = [{"stream": s, "transform": t.key if t is not None else None, "sites": len(p.entries),
                        "rank": p.meta.get("rank")} for (s, t), p in parts]
    return PatchSet(entries, meta)
