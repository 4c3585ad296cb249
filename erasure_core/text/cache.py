"""An on-disk cache of prompt encodings, per text-encoder fingerprint.

Large preserve sets (hundreds of artists) are encoded once per text encoder and reused by every
later erasure: :class:`CachedEncoder` wraps any ``TextEncoder`` and keeps, per fingerprint, one
safetensors file of per-prompt rows (float32, so a cached encoding equals a fresh one). The
fingerprint must change whenever the encoder would encode differently (other weights, another
CLIP layer, CLIP LoRAs); the caller computes it.
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

from .encoded import EncodedText, TextEncoder

__all__ = ["CachedEncoder"]

logger = logging.getLogger(__name__)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class CachedEncoder:
    """``TextEncoder`` that reads prompts from ``folder/<fingerprint>.safetensors`` and encodes
    only the ones missing there (then adds them). ``hits`` / ``misses`` count prompts."""

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

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        texts = list(texts)
        entries = self._read()
        missing = list(dict.fromkeys(t for t in texts if _key(t) + ".hidden" not in entries))
        if missing:
            fresh = self.encoder(missing)
            for i, text in enumerate(missing):
                entries[_key(text) + ".hidden"] = fresh.hidden[i].float().cpu().contiguous()
                entries[_key(text) + ".eot"] = fresh.eot_index[i : i + 1].cpu().contiguous()
                if fresh.token_ids is not None:
                    entries[_key(text) + ".ids"] = fresh.token_ids[i].cpu().contiguous()
                if fresh.pooled is not None:
                    entries[_key(text) + ".pooled"] = fresh.pooled[i].float().cpu().contiguous()
            self._write(entries)
        self.misses += len(missing)
        self.hits += len(set(texts)) - len(missing)
        keys = [_key(t) for t in texts]
        ids = [entries.get(k + ".ids") for k in keys]
        pooled = [entries.get(k + ".pooled") for k in keys]
        return EncodedText(
            tuple(texts),
            _stack_padded([entries[k + ".hidden"] for k in keys], 0.0) if keys else torch.zeros(0, 1, 1),
            torch.cat([entries[k + ".eot"] for k in keys]) if keys else torch.zeros(0, dtype=torch.long),
            pooled=torch.stack(pooled) if keys and all(p is not None for p in pooled) else None,  # type: ignore[arg-type]
            token_ids=_stack_padded(ids, -1) if keys and all(i is not None for i in ids) else None,  # type: ignore[arg-type]
        )


def _stack_padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Per-prompt ``[T_i, ...]`` stacked to ``[N, max T_i, ...]`` (DiT encoders without padding
    give prompts of different lengths; zero rows add nothing to a key Gram, ids -1 mark them)."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
