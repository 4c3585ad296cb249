"""An on-disk cache of prompt encodings, per text-encoder fingerprint.

Large preserve sets (hundreds of artists) are encoded once per text encoder and reused by every
later erasure: :class:`CachedEncoder` wraps any ``TextEncoder`` and keeps, per fingerprint, one
safetensors file of per-prompt rows (float32, so a cached encoding equals a fresh one). The
fingerprint must change whenever the encoder would encode differently (other weights, another
CLIP layer, CLIP LoRAs); the caller computes it.

A prompt encoded for ``rows="through_eot"`` is kept as its rows up to its EOT (``.head``); one
encoded at all rows (``.hidden``) serves both kinds of request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .encoded import EncodedText, TextEncoder, encode

__all__ = ["CachedEncoder"]

logger = logging.getLogger(__name__)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class CachedEncoder:
    """``TextEncoder`` that reads prompts from ``folder/<fingerprint>.safetensors`` and encodes
    only the ones missing there (then adds them). ``hits`` / ``misses`` count prompts."""

    accepts_rows = True  # forwarded to the wrapped encoder when it accepts them too

    def __init__(self, encoder: TextEncoder, folder: str | os.PathLike[str], fingerprint: str):
        self.encoder = encoder
        self.path = Path(folder) / f"{fingerprint}.safetensors"
        self.hits = 0
        self.misses = 0

    def _read(self) -> dict[str, torch.Tensor]:
        if not self.path.exists():
            return {}
        try:
            return load_file(self.path)
        except (SafetensorError, OSError, ValueError) as exc:
            logger.warning("Concept erasure: ignoring unreadable encoding cache %s (%s); it will be rebuilt.",
                           self.path, exc)
            return {}

    def _write(self, entries: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            save_file(entries, tmp)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def __call__(self, texts: Sequence[str], rows: str = "all") -> EncodedText:
        texts = list(texts)
        entries = self._read()
        short = rows == "through_eot"

        def cached(text: str) -> bool:
            key = _key(text)
            return key + ".hidden" in entries or (short and key + ".head" in entries)

        missing = list(dict.fromkeys(t for t in texts if not cached(t)))
        if missing:
            head = short and getattr(self.encoder, "accepts_rows", False)  # else all rows come back
            fresh = encode(self.encoder, missing, rows)
            for i, text in enumerate(missing):
                stop = int(fresh.eot_index[i]) + 1 if head else fresh.hidden.shape[1]
                kind = ".head" if head else ".hidden"
                entries[_key(text) + kind] = fresh.hidden[i, :stop].float().cpu().contiguous()
                entries[_key(text) + ".eot"] = fresh.eot_index[i : i + 1].cpu().contiguous()
                if fresh.token_ids is not None:
                    entries[_key(text) + ".ids"] = fresh.token_ids[i, :stop].cpu().contiguous()
            self._write(entries)
        self.misses += len(missing)
        self.hits += len(set(texts)) - len(missing)
        keys = [_key(t) for t in texts]
        if not keys:
            return EncodedText((), torch.zeros(0, 1, 1), torch.zeros(0, dtype=torch.long))
        eot = torch.cat([entries[k + ".eot"] for k in keys])
        hidden = [entries.get(k + ".hidden", entries.get(k + ".head")) for k in keys]
        ids = [entries.get(k + ".ids") for k in keys]
        if short:  # each prompt's rows through its EOT, zero (ids: -1) after it
            stop = int(eot.max()) + 1
            hidden = [_fit(h[: int(e) + 1], stop, 0.0) for h, e in zip(hidden, eot, strict=True)]
            ids = [None if i is None else _fit(i[: int(e) + 1], stop, -1) for i, e in zip(ids, eot, strict=True)]
        return EncodedText(
            tuple(texts), torch.stack(hidden), eot,
            token_ids=torch.stack(ids) if all(i is not None for i in ids) else None,
        )


def _fit(rows: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    """``rows`` padded with ``fill`` along the first axis to ``length``."""
    if len(rows) == length:
        return rows
    pad = rows.new_full((length - len(rows), *rows.shape[1:]), fill)
    return torch.cat([rows, pad])
