"""PatchSet: the weight edit every method returns and the only thing nodes apply.

Each entry is keyed by the *caller's* weight key and is either dense (``diff``, ``ΔW``; possibly
deferred: ``W₀ R``, taken when first read) or low rank (``up [d_out, r] @ down [r, d_in]``). A PatchSet is immutable; operations return new ones.
Saved files are safetensors with the factors and JSON metadata; they load back bit-identically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import replace_atomically
from ..errors import KEY_CHARS, PatchError, shown
from ..numeric import all_finite

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PatchEntry", "PatchSet", "SharedRight"]

FORMAT_NAME = "concept_erasure.patchset"
FORMAT_VERSION = "1"
_SUFFIXES = (".lora_up", ".lora_down", ".diff")
class SharedRight:
    """A factor ``[d, r]`` (float32, CPU) that many deferred entries multiply their weight by, with
    its copy on the device that takes their products (made once, not once per entry)."""

    def __init__(self, tensor: torch.Tensor, device: torch.device | str = "cpu"):
        self.tensor = tensor
        self.device = torch.device(device)
        self._on: torch.Tensor | None = None

    def on_device(self) -> torch.Tensor:
        if self._on is None:
            self._on = self.tensor.to(self.device)
        return self._on


class PatchEntry:
    """One key's edit: low rank (``up``, ``down``) or dense (``diff``), float32, 2-D. Immutable.

    An entry may be *deferred* (:meth:`deferred`): the UCE family's ``ΔW = W₀ P Q`` is held as a
    snapshot of the weight, the ``P`` its width shares and ``Q`` (``None``: dense, ``ΔW = W₀ P``).
    ``W₀ P`` (``diff``, or ``up``) is taken on its first read, on the device that solved the edit,
    then kept and the snapshot dropped. An edit that ComfyUI applies as a context transform never
    reads it, so erasing skips ``Σ d_out·d·r`` of work there; saving or applying as weights reads
    it once."""

    def __init__(self, up: torch.Tensor | None = None, down: torch.Tensor | None = None,
                 diff: torch.Tensor | None = None):
        low_rank = up is not None and down is not None
        if low_rank == (diff is not None) or (up is None) != (down is None):
            raise PatchError("a patch entry must be either (up, down) or diff, but got a mix.")
        for t in (up, down, diff):
            if t is None:
                continue
            if t.ndim != 2:
                raise PatchError(f"patch tensors must be 2-D, but got shape {tuple(t.shape)}.")
            if not all_finite(t):
                raise PatchError("patch tensors must be finite, but got NaN or inf.")
        if low_rank and up.shape[1] != down.shape[0]:  # type: ignore[union-attr]
            raise PatchError(
                f"up [d_out, r] and down [r, d_in] must share r, but got {tuple(up.shape)} "  # type: ignore[union-attr]
                f"and {tuple(down.shape)}."  # type: ignore[union-attr]
            )
        self._set(_left=up if low_rank else diff, down=down, _deferred=None)

    @classmethod
    def deferred(cls, weight: torch.Tensor, p: SharedRight, q: torch.Tensor | None = None) -> PatchEntry:
        """``ΔW = weight @ p.tensor @ q`` (``q`` ``None``: dense, ``weight @ p.tensor``), ``weight @ p``
        taken when first read. ``weight`` must be the caller's own copy (float32, CPU): it is kept."""
        width = p.tensor.shape[1]
        if weight.ndim != 2 or weight.shape[1] != p.tensor.shape[0] or (q is not None and q.shape[0] != width):
            raise PatchError(f"a deferred product needs weight [d_out, d], P [d, r] and Q [r, d], but got "
                             f"{tuple(weight.shape)}, {tuple(p.tensor.shape)} and "
                             f"{None if q is None else tuple(q.shape)}.")
        entry = cls.__new__(cls)
        entry._set(_left=None, down=q, _deferred=(weight, p))
        return entry

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PatchEntry is immutable")

    def __repr__(self) -> str:
        kind = "low rank" if self.is_low_rank else "dense"
        return f"PatchEntry({kind}{', deferred' if self.is_deferred else ''}, shape={self.shape}, rank={self.rank})"

    def _product(self) -> torch.Tensor:
        """``W₀ P`` (a deferred entry's product is taken now, once; the snapshot is then dropped)."""
        if self._deferred is not None:
            weight, p = self._deferred
            product = (weight.to(p.device) @ p.on_device()).cpu()
            if not all_finite(product):
                raise PatchError("patch tensors must be finite, but the edit overflowed float32. Lower "
                                 "'erase_scale' or raise 'lamb'.", input_name="erase_scale")
            self._set(_left=product, _deferred=None)
        return self._left  # type: ignore[return-value]

    @property
    def up(self) -> torch.Tensor | None:
        """``[d_out, r]`` of a low-rank entry; ``None`` when dense."""
        return self._product() if self.down is not None else None

    @property
    def diff(self) -> torch.Tensor | None:
        """``ΔW`` of a dense entry; ``None`` when low rank."""
        return self._product() if self.down is None else None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this entry holds now (a deferred one: the weight snapshot and its factors)."""
        held = (*self._deferred[:1], self._deferred[1].tensor) if self._deferred is not None else (self._left,)
        return tuple(t for t in (*held, self.down) if t is not None)

    @property
    def is_low_rank(self) -> bool:
        return self.down is not None

    @property
    def is_deferred(self) -> bool:
        """A deferred entry whose product has not been read yet."""
        return self._deferred is not None

    @property
    def shape(self) -> tuple[int, int]:
        rows = int(self._deferred[0].shape[0] if self._deferred is not None else self._left.shape[0])
        if self.down is not None:
            return (rows, int(self.down.shape[1]))
        return (rows, int(self._deferred[1].tensor.shape[1] if self._deferred is not None else self._left.shape[1]))

    @property
    def rank(self) -> int:
        if not self.is_low_rank:
            return min(self.shape)
        return int(self.down.shape[0])  # type: ignore[union-attr]

    def dense(self) -> torch.Tensor:
        """The weight difference ``ΔW`` as one float32 matrix."""
        if not self.is_low_rank:
            return self.diff.float()  # type: ignore[union-attr]
        return self.up.float() @ self.down.float()  # type: ignore[union-attr]

    def scaled(self, alpha: float) -> PatchEntry:
        if not self.is_low_rank:
            return PatchEntry(diff=self.diff * alpha)  # type: ignore[operator]
        return PatchEntry(up=self.up * alpha, down=self.down)  # type: ignore[operator]

    def plus(self, other: PatchEntry) -> PatchEntry:
        if self.shape != other.shape:
            raise PatchError(
                f"patches for one key must have equal shapes, but got {self.shape} and "
                f"{other.shape}. Merge patches made for the same model."
            )
        if self.is_low_rank and other.is_low_rank:
            return PatchEntry(up=torch.cat([self.up, other.up], 1),  # type: ignore[list-item]
                              down=torch.cat([self.down, other.down], 0))  # type: ignore[list-item]
        return PatchEntry(diff=self.dense() + other.dense())


@dataclass(frozen=True)
class PatchSet:
    """An immutable set of per-key weight edits with metadata (method, concepts, config, version)."""

    entries: Mapping[str, PatchEntry] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    context_multipliers: Mapping[int, tuple[torch.Tensor, torch.Tensor | None]] | None = field(
        default=None, compare=False, repr=False)
    """In memory only (never saved; every operation drops it): when every edited site of a key
    width ``d`` is ``W₀ M`` with one shared ``M − I = P Q`` (``P [d, r]``, ``Q [r, d]``, or
    ``Q = None`` for a dense ``P [d, d]``; float32), the multipliers per width, so a caller can
    apply the edit exactly as a transform of the sites' inputs instead of rounding it into
    low-precision weights (ARCHITECTURE §3, §7)."""

    def __post_init__(self) -> None:
        for key, entry in self.entries.items():
            if not isinstance(entry, PatchEntry):
                raise PatchError(f"entry {shown(key, KEY_CHARS)} must be a PatchEntry, but got {type(entry).__name__}.")
            if key.endswith(_SUFFIXES):
                raise PatchError(f"patch keys must not end with {_SUFFIXES}, but got {shown(key, KEY_CHARS)}.")
        try:
            json.dumps(dict(self.meta))
        except TypeError as exc:
            raise PatchError(f"patch metadata must be JSON-serialisable, but {exc}.") from exc
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    # -- mapping-like access -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> PatchEntry:
        return self.entries[key]

    @property
    def max_rank(self) -> int:
        return max((e.rank for e in self.entries.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors (shared tensors counted once)."""
        seen: dict[int, int] = {}
        for entry in self.entries.values():
            for t in entry.tensors():
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- algebra ---------------------------------------------------------------------------
    def scaled(self, alpha: float) -> PatchSet:
        """Every delta multiplied by ``alpha`` (0 gives the identity edit)."""
        return PatchSet({k: e.scaled(alpha) for k, e in self.entries.items()}, self.meta)

    def merged(self, other: PatchSet) -> PatchSet:
        """Per-key sum of two edits (low-rank factors are concatenated, so ranks add)."""
        entries = dict(self.entries)
        for key, entry in other.entries.items():
            entries[key] = entries[key].plus(entry) if key in entries else entry
        meta = {"merged": [dict(self.meta), dict(other.meta)]}
        return PatchSet(entries, meta)

    def restricted(self, keys: Iterable[str]) -> PatchSet:
        """Only the entries whose key is in ``keys``."""
        wanted = set(keys)
        return PatchSet({k: e for k, e in self.entries.items() if k in wanted}, self.meta)

    # -- files -----------------------------------------------------------------------------
    def to_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors (contiguous, unshared, on the CPU) and string metadata for safetensors."""
        tensors: dict[str, torch.Tensor] = {}
        for key, entry in self.entries.items():
            if entry.is_low_rank:
                tensors[key + ".lora_up"] = entry.up.detach().cpu().contiguous().clone()  # type: ignore[union-attr]
                tensors[key + ".lora_down"] = entry.down.detach().cpu().contiguous().clone()  # type: ignore[union-attr]
            else:
                tensors[key + ".diff"] = entry.diff.detach().cpu().contiguous().clone()  # type: ignore[union-attr]
        metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                    "meta": json.dumps(dict(self.meta), sort_keys=True)}
        return tensors, metadata

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, *,
                        input_name: str | None = None, name: str = "the patch file") -> PatchSet:
        """The PatchSet a :meth:`to_state_dict` pair holds; PatchError naming the file as ``name`` and
        blaming ``input_name`` when anything in it is malformed."""
        metadata = metadata or {}
        if metadata.get("format") != FORMAT_NAME:
            raise PatchError(
                f"{name} must be a concept-erasure patch file (metadata format '{FORMAT_NAME}'), but got "
                f"format {shown(metadata.get('format'))}. Load eraser LoRAs with Apply Eraser LoRA instead.",
                input_name=input_name)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise PatchError(
                f"{name} must be patch format version {FORMAT_VERSION}, but got "
                f"{shown(metadata.get('format_version'))}. Update the node pack.", input_name=input_name)
        meta = _decode_meta(metadata.get("meta", "{}"), name, input_name)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise PatchError(f"every tensor of {name} must end with one of {_SUFFIXES}, but got "
                                 f"{shown(key, KEY_CHARS)}. Re-save the patch.", input_name=input_name)
            if key[: -len(suffix)].endswith(_SUFFIXES):
                raise PatchError(f"every tensor of {name} must be named <weight key>{'|'.join(_SUFFIXES)}, but "
                                 f"got {shown(key, KEY_CHARS)}. Re-save the patch.", input_name=input_name)
            parts.setdefault(key[: -len(suffix)], {})[suffix[1:]] = tensor
        entries = {}
        for key, p in parts.items():
            try:
                entries[key] = PatchEntry(up=p.get("lora_up"), down=p.get("lora_down"), diff=p.get("diff"))
            except PatchError as exc:
                raise PatchError(f"every entry of {name} must be well formed, but {shown(key, KEY_CHARS)} is not: "
                                 f"{exc.message} Re-save the patch.", input_name=input_name) from exc
        try:
            return cls(entries, meta)
        except PatchError as exc:
            raise PatchError(f"{name} must be a well-formed patch ({exc.message}) Re-save the patch.",
                             input_name=input_name) from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file atomically (a failed write leaves no partial file)."""
        tensors, metadata = self.to_state_dict()
        replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, input_name: str | None = "eraser") -> PatchSet:
        """Read a file written by :meth:`save` (safetensors only; nothing is unpickled). Errors name
        the file (not its folders) and blame the node input ``input_name``."""
        name = f"patch file {shown(os.path.basename(os.fspath(path)))}"
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                metadata = f.metadata()
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # OSError, or SafetensorError (derives from Exception only)
            raise PatchError(
                f"{name} must be a readable .safetensors file, but reading it failed "
                f"({shown(str(exc), 200)}). Check the file, or re-save the patch.", input_name=input_name
            ) from exc
        return cls.from_state_dict(tensors, metadata, input_name=input_name, name=name)


META_LIMIT = 1 << 20
"""Most characters of a patch file's ``meta`` JSON (a thousand concepts with their config take tens of KB)."""


def _decode_meta(text: object, name: str, input_name: str | None) -> dict[str, Any]:
    """The ``meta`` metadata of a patch file as a dict; PatchError when it is not a JSON object."""
    if not isinstance(text, str) or len(text) > META_LIMIT:
        size = f"{len(text):,} characters" if isinstance(text, str) else type(text).__name__
        raise PatchError(f"the 'meta' of {name} must be a JSON object of at most {META_LIMIT:,} characters, but "
                         f"it has {size}. Re-save the patch.", input_name=input_name)
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise PatchError(f"the 'meta' of {name} must be valid JSON, but {shown(reason, 120)}. Re-save the patch.",
                         input_name=input_name) from None
    if not isinstance(meta, dict):
        raise PatchError(f"the 'meta' of {name} must be a JSON object, but got {shown(text)}. Re-save the patch.",
                         input_name=input_name)
    return meta
