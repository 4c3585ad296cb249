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

A prompt encoded for ``rows="through_eot"`` is kept as its rows up to its EOT (``.head``), one
encoded for ``"through_last_word"`` as its rows up to its last word (``.lead``); an entry serves
its own kind of request and the narrower ones (``.hidden``, all rows, serves every request).
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
    accepts_last_word = True

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
    def _usable(entries: dict[str, torch.Tensor], key: str, width: int | None, rows: str) -> bool:
        """A cached prompt can serve this ``rows`` request (an entry of its kind or a wider one,
        see :data:`_KINDS`), of the cache's width and finite. Lengths may differ (DiT encoders do
        not pad)."""
        if key + ".eot" not in entries:
            return False
        found = _entry(entries, key, rows)
        return found is not None and (width is None or found.shape[-1] == width) and bool(torch.isfinite(found).all())

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
            for suffix in (*_KINDS.values(), ".eot", ".ids", ".pooled"):
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
        short = rows != "all"
        keys = [_key(t) for t in texts]
        widths = {v.shape[-1] for k, v in entries.items() if k.endswith(tuple(_KINDS.values()))}
        width = next(iter(widths)) if len(widths) == 1 else None
        if len(widths) > 1:  # more than one width: a damaged file; start again
            entries = {}
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True)
                                     if not self._usable(entries, k, width, rows)))
        fresh_entries: dict[str, torch.Tensor] = {}
        if missing:
            got = _rows_returned(self.encoder, rows)
            fresh = encode(self.encoder, missing, rows)
            for i, text in enumerate(missing):
                key = _key(text)
                stop = _stop(got, int(fresh.eot_index[i]), fresh.hidden.shape[1])
                for other in _KINDS.values():  # unusable older entries of the other kinds
                    entries.pop(key + other, None)
                fresh_entries[key + _KINDS[got]] = fresh.hidden[i, :stop].float().cpu().contiguous()
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
            self._write_lru({k: v for k, v in lru.items() if any(k + kind in entries for kind in _KINDS.values())})
            self._entries = entries
        if not keys:
            return EncodedText((), torch.zeros(0, 1, 1), torch.zeros(0, dtype=torch.long))
        eot = torch.cat([entries[k + ".eot"] for k in keys])
        hidden = [_entry(entries, k, rows) for k in keys]
        ids = [entries.get(k + ".ids") for k in keys]
        pooled = [entries.get(k + ".pooled") for k in keys]
        least = int(eot.max()) + 1  # EncodedText's rows must hold every EOT position
        if short:  # each prompt's rows through its EOT (or last word), zero (ids: -1) after it
            hidden = [h[: _stop(rows, int(e), len(h))] for h, e in zip(hidden, eot, strict=True)]
            ids = [None if i is None else i[: _stop(rows, int(e), len(i))] for i, e in zip(ids, eot, strict=True)]
        return EncodedText(
            tuple(texts), _stack_padded(hidden, 0.0, least), eot,
            pooled=torch.stack(pooled) if all(p is not None for p in pooled) else None,  # type: ignore[arg-type]
            token_ids=_stack_padded(ids, -1, least) if all(i is not None for i in ids) else None,  # type: ignore[arg-type]
        )


_KINDS = {"all": ".hidden", "through_eot": ".head", "through_last_word": ".lead"}
"""The entry each rows mode stores, widest first: an entry serves its own mode and those after it."""


def _entry(entries: dict[str, torch.Tensor], key: str, rows: str) -> torch.Tensor | None:
    """The cached rows of ``key`` that serve a ``rows`` request (the first kind at least as wide)."""
    modes = list(_KINDS)
    for mode in modes[: modes.index(rows) + 1]:
        found = entries.get(key + _KINDS[mode])
        if found is not None:
            return found
    return None


def _rows_returned(encoder: TextEncoder, rows: str) -> str:
    """The rows mode ``encode(encoder, ..., rows)`` returns (all rows where the encoder cannot stop early)."""
    if rows == "all" or not getattr(encoder, "accepts_rows", False):
        return "all"
    return rows if rows == "through_eot" or getattr(encoder, "accepts_last_word", False) else "through_eot"


def _stop(rows: str, eot: int, length: int) -> int:
    """How many leading rows of a prompt a ``rows`` mode holds (its last word is at ``eot - 1``, or 0)."""
    if rows == "all":
        return length
    return min(length, eot + 1 if rows == "through_eot" else max(eot, 1))


def _stack_padded(rows: list[torch.Tensor], fill: float, at_least: int = 0) -> torch.Tensor:
    """Per-prompt ``[T_i, ...]`` stacked to ``[N, max T_i, ...]`` (at least ``at_least`` rows):
    through-EOT heads, and DiT encoders without padding, give prompts of different lengths; zero
    rows add nothing to a key Gram, ids -1 mark them."""
    length = max(at_least, *(r.shape[0] for r in rows))
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
