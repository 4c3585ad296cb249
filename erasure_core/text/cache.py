"""An on-disk cache of prompt encodings, per text-encoder fingerprint.

Large preserve sets (hundreds of artists) are encoded once per text encoder and reused by every
later erasure: :class:`CachedEncoder` wraps any ``TextEncoder`` and keeps, per fingerprint, one
safetensors file of per-prompt rows (float32, so a cached encoding equals a fresh one). The
fingerprint must change whenever the encoder would encode differently (other weights, another
CLIP layer, CLIP LoRAs); the caller computes it.

The cache is bounded: ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, or the environment
variable ``CE_ENCODING_CACHE_MB``) caps the whole folder. Each fingerprint's file keeps a small
``<fingerprint>.lru.json`` of when each prompt was last used; past the cap the least recently used
prompts are dropped first (never those of the current call), then whole files of other text
encoders, oldest first. A cached row that is not finite or not of the batch's shape is encoded
again rather than trusted.

A prompt encoded for ``rows="through_eot"`` is kept as its rows up to its EOT (``.head``); one
encoded at all rows (``.hidden``) serves both kinds of request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .encoded import EncodedText, TextEncoder, encode

__all__ = ["DEFAULT_MAX_BYTES", "CachedEncoder", "cache_limit_bytes"]

DEFAULT_MAX_BYTES = 1024 * 2**20
"""1 GiB: about 4,300 SD1.5 prompts or 2,200 SDXL prompts (77 rows of 768 or 2048 floats)."""


def cache_limit_bytes() -> int:
    """The cap: ``CE_ENCODING_CACHE_MB`` (0 turns the cache off), else :data:`DEFAULT_MAX_BYTES`."""
    raw = os.environ.get("CE_ENCODING_CACHE_MB", "")
    try:
        return max(0, int(float(raw) * 2**20)) if raw.strip() else DEFAULT_MAX_BYTES
    except ValueError:
        logger.warning("Concept erasure: CE_ENCODING_CACHE_MB=%r is not a number; using %d MiB.", raw,
                       DEFAULT_MAX_BYTES // 2**20)
        return DEFAULT_MAX_BYTES

logger = logging.getLogger(__name__)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class CachedEncoder:
    """``TextEncoder`` that reads prompts from ``folder/<fingerprint>.safetensors`` and encodes
    only the ones missing there (then adds them). ``hits`` / ``misses`` count prompts."""

    accepts_rows = True  # forwarded to the wrapped encoder when it accepts them too

    def __init__(self, encoder: TextEncoder, folder: str | os.PathLike[str], fingerprint: str,
                 max_bytes: int | None = None):
        self.encoder = encoder
        self.path = Path(folder) / f"{fingerprint}.safetensors"
        self.lru_path = Path(folder) / f"{fingerprint}.lru.json"
        self.max_bytes = cache_limit_bytes() if max_bytes is None else max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, torch.Tensor] | None = None  # the file as this instance last read or wrote it

    def _read(self) -> dict[str, torch.Tensor]:
        if not self.path.exists():
            return {}
        try:
            return load_file(self.path)
        except (SafetensorError, OSError, ValueError) as exc:
            logger.warning("Concept erasure: ignoring unreadable encoding cache %s (%s); it will be rebuilt.",
                           self.path, exc)
            return {}

    def _read_lru(self) -> dict[str, float]:
        try:
            data = json.loads(self.lru_path.read_text())
            return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError, TypeError):
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

    def _write_lru(self, lru: dict[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(lru, f)
        os.replace(tmp, self.lru_path)

    @staticmethod
    def _stored(entries: dict[str, torch.Tensor], key: str, width: int | None, short: bool) -> torch.Tensor | None:
        """The cached rows that can serve this request: all its rows (``.hidden``), or, for a
        through-EOT request, its rows up to EOT (``.head``); of the cache's width. Lengths may
        differ (DiT encoders do not pad). Finiteness is checked by the caller, batched."""
        eot = entries.get(key + ".eot")
        if eot is None:
            return None
        rows = entries.get(key + ".hidden")
        if rows is None and short:
            rows = entries.get(key + ".head")
        if rows is None or (width is not None and rows.shape[-1] != width):
            return None
        return rows[: int(eot[0]) + 1] if short else rows  # a through-EOT request reads no later row

    def _unusable(self, entries: dict[str, torch.Tensor], keys: dict[str, str], width: int | None,
                  short: bool) -> tuple[list[str], torch.Tensor | None]:
        """The prompts of ``keys`` (text -> key) the cache cannot serve (absent, of another width or
        not finite), and the stacked rows of all of them when every one is served (else None).
        Finiteness is one check over the stacked rows: a few ops per call, not two per prompt (on
        a busy CPU each multi-threaded op costs milliseconds of thread wake-ups)."""
        stored = {t: self._stored(entries, k, width, short) for t, k in keys.items()}
        found = [t for t, rows in stored.items() if rows is not None]
        if not found:
            return list(stored), None
        stacked = _stack_padded([stored[t] for t in found], 0.0)
        finite = torch.isfinite(stacked).flatten(1).all(1).tolist()
        missing = [t for t, rows in stored.items() if rows is None]
        missing += [t for t, ok in zip(found, finite, strict=True) if not ok]
        return missing, (stacked if not missing else None)

    def _evict(self, entries: dict[str, torch.Tensor], lru: dict[str, float], keep: set[str]) -> bool:
        """Drop least recently used prompts (not ``keep``) until this file fits its share of the
        cap, then other fingerprints' files, oldest first. False if even ``keep`` does not fit."""
        def size() -> int:
            return sum(t.numel() * t.element_size() for t in entries.values())

        others = sorted((f for f in self.path.parent.glob("*.safetensors") if f != self.path),
                        key=lambda f: f.stat().st_mtime)
        other_bytes = sum(f.stat().st_size for f in others)
        keys = sorted({k.rsplit(".", 1)[0] for k in entries} - keep, key=lambda k: lru.get(k, 0.0))
        while size() > self.max_bytes and keys:
            old = keys.pop(0)
            for suffix in (".hidden", ".head", ".eot", ".ids", ".pooled"):
                entries.pop(old + suffix, None)
            lru.pop(old, None)
        while others and size() + other_bytes > self.max_bytes:
            victim = others.pop(0)
            other_bytes -= victim.stat().st_size
            for path in (victim, victim.with_suffix(".lru.json")):
                path.unlink(missing_ok=True)
        return size() <= self.max_bytes

    def __call__(self, texts: Sequence[str], rows: str = "all") -> EncodedText:
        texts = list(texts)
        # one read per instance (a node's erase, its check and SPEED's null prompt share it), not one per call
        entries = (self._entries if self._entries is not None else self._read()) if self.max_bytes > 0 else {}
        short = rows == "through_eot"
        keys = [_key(t) for t in texts]
        widths = {v.shape[-1] for k, v in entries.items() if k.endswith((".hidden", ".head"))}
        width = next(iter(widths)) if len(widths) == 1 else None
        if len(widths) > 1:  # more than one width: a damaged file; start again
            entries = {}
        missing, served = self._unusable(entries, dict(zip(texts, keys, strict=True)), width, short)
        fresh_entries: dict[str, torch.Tensor] = {}
        if missing:
            head = short and getattr(self.encoder, "accepts_rows", False)  # else all rows come back
            fresh = encode(self.encoder, missing, rows)
            for i, text in enumerate(missing):
                key = _key(text)
                stop = int(fresh.eot_index[i]) + 1 if head else fresh.hidden.shape[1]
                kind, other = (".head", ".hidden") if head else (".hidden", ".head")
                fresh_entries[key + kind] = fresh.hidden[i, :stop].float().cpu().contiguous()
                entries.pop(key + other, None)  # an unusable older entry of the other kind
                fresh_entries[key + ".eot"] = fresh.eot_index[i : i + 1].cpu().contiguous()
                if fresh.token_ids is not None:
                    fresh_entries[key + ".ids"] = fresh.token_ids[i, :stop].cpu().contiguous()
                if fresh.pooled is not None:
                    fresh_entries[key + ".pooled"] = fresh.pooled[i].float().cpu().contiguous()
            if width is not None and fresh.hidden.shape[-1] != width:
                entries = {}  # another width: the old rows belong to another encoder layout
        entries |= fresh_entries
        self.misses += len(missing)
        self.hits += len(set(texts)) - len(missing)
        if self.max_bytes > 0:
            lru = self._read_lru()
            now = time.time()
            lru |= dict.fromkeys(keys, now)
            if missing:
                if self._evict(entries, lru, set(keys)):
                    self._write(entries)
                else:
                    logger.warning("Concept erasure: %d prompts' encodings exceed the cache cap of %d MiB "
                                   "(CE_ENCODING_CACHE_MB); they are not cached.", len(set(keys)), self.max_bytes >> 20)
            self._write_lru({k: v for k, v in lru.items() if k + ".hidden" in entries or k + ".head" in entries})
            self._entries = entries
        if not keys:
            return EncodedText((), torch.zeros(0, 1, 1), torch.zeros(0, dtype=torch.long))
        eot = torch.cat([entries[k + ".eot"] for k in keys])
        ids = [entries.get(k + ".ids") for k in keys]
        pooled = [entries.get(k + ".pooled") for k in keys]
        if served is not None and len(set(texts)) == len(texts):  # all cached: the rows checked above
            hidden = served
        else:
            rows = [entries.get(k + ".hidden", entries.get(k + ".head")) for k in keys]
            if short:  # each prompt's rows through its EOT, zero after it
                rows = [h[: int(e) + 1] for h, e in zip(rows, eot.tolist(), strict=True)]
            hidden = _stack_padded(rows, 0.0)
        if short:  # ids -1 after each prompt's EOT
            ids = [None if i is None else i[: int(e) + 1] for i, e in zip(ids, eot.tolist(), strict=True)]
        return EncodedText(
            tuple(texts), hidden, eot,
            pooled=torch.stack(pooled) if all(p is not None for p in pooled) else None,  # type: ignore[arg-type]
            token_ids=_stack_padded(ids, -1) if all(i is not None for i in ids) else None,  # type: ignore[arg-type]
        )


def _stack_padded(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Per-prompt ``[T_i, ...]`` stacked to ``[N, max T_i, ...]``: through-EOT heads, and DiT
    encoders without padding, give prompts of different lengths; zero rows add nothing to a key
    Gram, ids -1 mark them."""
    length = max(r.shape[0] for r in rows)
    if all(r.shape[0] == length for r in rows):
        return torch.stack(rows)  # one op (every row of a padded window: the common case)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
