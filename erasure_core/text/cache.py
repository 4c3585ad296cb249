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
its own kind of request and the narrower ones (``.hidden``, all rows, serves every request). An
encoder's per-layer states of a second encoder (``EncodedText.layered``: HiDream's Llama) are kept
beside them as ``.layers-<name>`` ``[L, T, D]`` with their own ``-eot`` and ``-ids``; a prompt is
served from the file only if it has every such stream the file holds (32 Llama layers make a HiDream
prompt about 32 times larger than its T5 rows, so the cap holds fewer of them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import replace_atomically
from ..numeric import all_finite
from .encoded import EncodedText, LayerStates, TextEncoder, encode, rows_returned

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


_LAYERS = ".layers-"  # entry suffix of per-layer states: <key>.layers-<name>[-eot|-ids]


def _layered_names(entries: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(_LAYERS, 1)[1] for k in entries if _LAYERS in k and not k.endswith(("-eot", "-ids"))}


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
        replace_atomically(self.path, lambda tmp: save_file(entries, tmp), make_folder=True)

    def _write_lru(self, lru: dict[str, float]) -> None:
        replace_atomically(self.lru_path, lambda tmp: Path(tmp).write_text(json.dumps(lru)), make_folder=True)

    @staticmethod
    def _usable(entries: dict[str, torch.Tensor], key: str, width: int | None, rows: str,
                layered: AbstractSet[str] = frozenset()) -> bool:
        """A cached prompt can serve this ``rows`` request (an entry of its kind or a wider one,
        see :data:`_KINDS`), of the cache's width, with every per-layer stream in ``layered``. Lengths
        may differ (DiT encoders do not pad). Finiteness is checked for all prompts at once by
        :func:`_not_finite`."""
        if key + ".eot" not in entries or any(key + _LAYERS + n not in entries for n in layered):
            return False
        found = _entry(entries, key, rows)
        return found is not None and (width is None or found.shape[-1] == width)

    def _evict(self, entries: dict[str, torch.Tensor], lru: dict[str, float], keep: set[str]) -> bool:
        """Drop least recently used prompts (not ``keep``) until this file fits its share of the
        cap, then other fingerprints' files, oldest first. False if even ``keep`` does not fit."""
        def nbytes(name: str) -> int:
            return entries[name].numel() * entries[name].element_size()

        size = sum(nbytes(name) for name in entries)
        others = sorted((f for f in self.path.parent.glob("*.safetensors") if f != self.path),
                        key=lambda f: f.stat().st_mtime)
        other_bytes = sum(f.stat().st_size for f in others)
        by_prompt: dict[str, list[str]] = {}
        for name in entries:
            by_prompt.setdefault(name.rsplit(".", 1)[0], []).append(name)
        keys = sorted(set(by_prompt) - keep, key=lambda k: lru.get(k, 0.0))
        while size > self.max_bytes and keys:
            old = keys.pop(0)
            for name in by_prompt[old]:
                size -= nbytes(name)
                entries.pop(name)
            lru.pop(old, None)
        if size > self.max_bytes:
            return False  # even ``keep`` does not fit: nothing is written, so no other file is deleted
        while others and size + other_bytes > self.max_bytes:
            victim = others.pop(0)
            other_bytes -= victim.stat().st_size
            for path in (victim, victim.with_suffix(".lru.json")):
                path.unlink(missing_ok=True)
        return size <= self.max_bytes

    def _encode(self, texts: list[str], rows: str,
                entries: dict[str, torch.Tensor]) -> tuple[EncodedText, dict[str, torch.Tensor]]:
        """Encode ``texts`` and give their cache entries (older entries of the other kinds dropped)."""
        got = rows_returned(self.encoder, rows)
        fresh = encode(self.encoder, texts, rows)
        out: dict[str, torch.Tensor] = {}
        for i, text in enumerate(texts):
            key = _key(text)
            stop = _stop(got, int(fresh.eot_index[i]), fresh.hidden.shape[1])
            for other in _KINDS.values():  # unusable older entries of the other kinds
                entries.pop(key + other, None)
            out[key + _KINDS[got]] = fresh.hidden[i, :stop].float().cpu().contiguous()
            out[key + ".eot"] = fresh.eot_index[i : i + 1].cpu().contiguous()
            if fresh.token_ids is not None:
                out[key + ".ids"] = fresh.token_ids[i, :stop].cpu().contiguous()
            if fresh.pooled is not None:
                out[key + ".pooled"] = fresh.pooled[i].float().cpu().contiguous()
            for name, states in fresh.layered.items():
                # through its own EOT at the widest (a per-layer stream is only read whole or to its EOT)
                end = states.hidden.shape[2] if got == "all" else int(states.eot_index[i]) + 1
                base = key + _LAYERS + name
                out[base] = states.hidden[i, :, :end].float().cpu().contiguous()
                # clones: they may share the main stream's tensors, which safetensors refuses to save twice
                out[base + "-eot"] = states.eot_index[i : i + 1].cpu().clone()
                if states.token_ids is not None:
                    out[base + "-ids"] = states.token_ids[i, :end].cpu().clone()
        return fresh, out

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
        layered = _layered_names(entries)
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True)
                                     if not self._usable(entries, k, width, rows, layered)))
        unusable = set(missing)
        served = [t for t in dict.fromkeys(texts) if t not in unusable]
        missing += _not_finite(entries, served, rows, layered)
        fresh_entries: dict[str, torch.Tensor] = {}
        if missing:
            fresh, fresh_entries = self._encode(missing, rows, entries)
            if (width is not None and fresh.hidden.shape[-1] != width) or (entries and set(fresh.layered) != layered):
                entries = {}  # another width or other per-layer streams: another encoder layout
                rest = [t for t in dict.fromkeys(texts) if t not in missing]  # served from that layout
                if rest:
                    fresh_entries |= self._encode(rest, rows, entries)[1]
                    missing += rest
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
            layered={name: _layer_states(entries, keys, name, short) for name in _layered_names(entries)
                     if all(k + _LAYERS + name in entries for k in keys)},
        )


FINITE_CHUNK = 64 << 20  # bytes of cached rows checked per copy: bounded memory for HiDream's per-layer states


def _not_finite(entries: dict[str, torch.Tensor], texts: list[str], rows: str,
                layered: AbstractSet[str] = frozenset()) -> list[str]:
    """The ``texts`` whose cached rows (main and per-layer) hold a non-finite value, a group of prompts
    (up to :data:`FINITE_CHUNK` bytes) per check: on a busy CPU every multi-threaded op over a prompt's
    rows costs milliseconds of thread wake-ups, so two ops per prompt (45 bank prompts: 90) cost more
    than the read itself, while one copy of every prompt would cost HiDream's ~64 MiB each at once."""
    bad: list[str] = []
    group: list[tuple[str, list[torch.Tensor]]] = []
    size = 0
    for i, text in enumerate(texts):
        key = _key(text)
        parts = [_entry(entries, key, rows), *(entries[key + _LAYERS + n] for n in layered)]
        group.append((text, parts))
        size += sum(p.numel() * p.element_size() for p in parts)
        if size >= FINITE_CHUNK or i == len(texts) - 1:
            bad += _bad_in(group)
            group, size = [], 0
    return bad


def _bad_in(group: list[tuple[str, list[torch.Tensor]]]) -> list[str]:
    """The prompts of ``group`` with a non-finite value: one copy and one sum; per prompt only then."""
    flat = torch.cat([p.reshape(-1) for _, parts in group for p in parts])
    if all_finite(flat):
        return []
    bad = ~torch.isfinite(flat)
    ends = torch.tensor([sum(p.numel() for p in parts) for _, parts in group]).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [t for (t, _), a, b in zip(group, starts, ends, strict=True) if bool(bad[a:b].any())]


def _layer_states(entries: dict[str, torch.Tensor], keys: list[str], name: str, short: bool) -> LayerStates:
    """One per-layer stream of ``keys`` stacked to ``[N, L, T, D]`` (shorter prompts padded with zero rows)."""
    base = [k + _LAYERS + name for k in keys]
    eot = torch.cat([entries[b + "-eot"] for b in base])
    rows = [entries[b].transpose(0, 1) for b in base]  # [T_i, L, D]: padded along T
    ids = [entries.get(b + "-ids") for b in base]
    if short:
        rows = [r[: int(e) + 1] for r, e in zip(rows, eot, strict=True)]
        ids = [None if i is None else i[: int(e) + 1] for i, e in zip(ids, eot, strict=True)]
    least = int(eot.max()) + 1
    return LayerStates(_stack_padded(rows, 0.0, least).transpose(1, 2), eot,
                       _stack_padded(ids, -1, least) if all(i is not None for i in ids) else None)  # type: ignore[arg-type]


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
    if all(r.shape[0] == length for r in rows):
        return torch.stack(rows)  # one op, not one copy per prompt (every row of a padded window)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
