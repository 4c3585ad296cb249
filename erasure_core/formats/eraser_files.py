"""Reading eraser files safely: safetensors lazily, ``.pt``/``.bin``/``.ckpt`` only as plain tensors.

Erasure papers ship their results as safetensors (ESD-new, EraseAnything, SPM, our own patch
files), as ``torch.save`` dicts (ESD paper weights, RECE, ANT, SPEED, Receler's
``eraser_weights.pt``) or as HF folders (``pytorch_model.bin`` of a CLIPTextModel). A pickle can
run code when it is loaded, so ``.pt``-like files are read with ``torch.load(weights_only=True)``
only; when that refuses the file, so do we: there is never a fallback to a full unpickle.

Nested dicts (Receler's ``{block: {"down.weight": ...}}``, checkpoints wrapped in
``{"state_dict": ...}``) are flattened to dotted keys. Receler's ``eraser_config.json`` beside
the weights of a Receler file (keys like ``down_blocks.0.attentions.0.down.weight``) is read into
``EraserFile.config``: at most 64 KiB, and only when its real path stays in the weights' folder.

Every reader takes ``input_name``, the node input the file was picked in ("eraser" in Apply Eraser
LoRA, "erased_file" in Extract Eraser): errors name that input, in their wording and as their
``input_name``, including those raised later when a tensor is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ErasureError, shown
from ..numeric import all_finite
from .eraser_formats import RECELER_BLOCK

__all__ = ["PICKLE_EXTENSIONS", "EraserFile", "SAFE_EXTENSIONS", "checked_tensor", "file_words", "open_eraser"]

SAFE_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
RECELER_CONFIG = "eraser_config.json"
_WRAPPERS = ("state_dict", "model", "module")  # {"state_dict": {...}} checkpoints


@dataclass
class EraserFile(Mapping[str, torch.Tensor]):
    """The tensors of one eraser file, read on demand, with their shapes, dtypes and metadata.

    ``shapes`` is known without reading any tensor (safetensors header). ``self[key]`` reads one
    tensor; for a ``.pt`` file every tensor is already in memory (memory-mapped when possible).
    ``input_name`` is the node input the file was picked in; errors on reading name it.
    """

    path: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = None
    input_name: str = "eraser"

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        if self._tensors is not None:
            return checked_tensor(self.name, key, self._tensors[key], input_name=self.input_name)
        try:
            with safe_open(self.path, framework="pt") as f:
                tensor = f.get_tensor(key)
        except Exception as exc:  # SafetensorError (truncated file) derives from Exception only
            raise ErasureError(f"{file_words(self.input_name)} '{self.name}' must be complete, but reading '{key}' "
                               f"failed ({exc}). Re-download or re-save the file.",
                               input_name=self.input_name) from exc
        return checked_tensor(self.name, key, tensor, input_name=self.input_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor (for small files: LoRAs, adapters)."""
        return {k: self[k] for k in self.shapes}

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def file_words(input_name: str) -> str:
    """How a message names the file picked in ``input_name``: "eraser file" for Apply Eraser LoRA's
    'eraser', but "erased_file" as it is (the input's name already says it is a file)."""
    return input_name if input_name.endswith("file") else f"{input_name} file"


def checked_tensor(file: str, key: str, tensor: torch.Tensor, *, input_name: str = "eraser") -> torch.Tensor:
    """``tensor`` if it is usable as a weight; otherwise ErasureError naming the file, key and
    shape: empty (a rank-0 LoRA factor has no rows), or holding NaN or inf (which would turn every
    sampled image into NaN without an error)."""
    shape = tuple(tensor.shape)
    if tensor.ndim > 0 and tensor.numel() == 0:
        raise ErasureError(f"{file_words(input_name)} '{file}' must hold non-empty weights, but '{key}' has shape "
                           f"{shape} (rank 0). Re-export the eraser with rank 1 or more.", input_name=input_name)
    if tensor.is_floating_point() and not all_finite(tensor):
        raise ErasureError(f"{file_words(input_name)} '{file}' must hold finite weights, but '{key}' {shape} has NaN "
                           "or inf values. The file is broken: re-download or re-train it.", input_name=input_name)
    return tensor


def open_eraser(path: str | os.PathLike[str], *, input_name: str = "eraser") -> EraserFile:
    """Open an eraser file (or a Receler folder holding ``eraser_weights.pt``) without running code.

    Raises ErasureError naming ``input_name`` and the file when it is missing, unreadable, or a
    pickle that holds anything but tensors and plain containers.
    """
    path = os.fspath(path)
    words = file_words(input_name)
    if os.path.isdir(path):
        candidates = [n for n in ("eraser_weights.safetensors", "eraser_weights.pt", "model.safetensors",
                                  "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))]
        if not candidates:
            raise ErasureError(f"{input_name} folder '{path}' must hold eraser_weights.pt, a .safetensors file or "
                               "pytorch_model.bin, but holds none of them. Pick the weights file itself.",
                               input_name=input_name)
        path = os.path.join(path, candidates[0])
    if not os.path.isfile(path):
        raise ErasureError(f"{words} '{path}' must exist, but it does not. Refresh the list (R) and "
                           "pick it again.", input_name=input_name)
    lower = path.lower()
    if lower.endswith(SAFE_EXTENSIONS):
        result = _open_safetensors(path, input_name)
    elif lower.endswith(PICKLE_EXTENSIONS):
        result = _open_torch(path, input_name)
    else:
        raise ErasureError(f"{words} must end with one of {SAFE_EXTENSIONS + PICKLE_EXTENSIONS}, but got "
                           f"'{os.path.basename(path)}'. Convert it to .safetensors.", input_name=input_name)
    if any(RECELER_BLOCK.match(k) for k in result.shapes):  # only Receler's weights have a sidecar
        result.config = _sidecar_config(path, input_name)
    return result


def _open_safetensors(path: str, input_name: str) -> EraserFile:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes, dtypes = {}, {}
            for key in f.keys():
                part = f.get_slice(key)
                shapes[key] = tuple(int(s) for s in part.get_shape())
                dtypes[key] = str(part.get_dtype())
    except Exception as exc:  # SafetensorError derives from Exception only
        raise _unreadable(path, exc, input_name) from exc
    return EraserFile(path, shapes, metadata, dtypes=dtypes, input_name=input_name)


def _unreadable(path: str, exc: BaseException, input_name: str) -> ErasureError:
    return ErasureError(f"{file_words(input_name)} '{os.path.basename(path)}' must be a readable safetensors file, "
                        f"but reading its header failed ({exc}). Re-download or re-save the file.",
                        input_name=input_name)


def _open_torch(path: str, input_name: str) -> EraserFile:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ErasureError(f"{file_words(input_name)} '{os.path.basename(path)}' must be readable, but reading "
                           f"failed ({exc}).", input_name=input_name) from exc
    except Exception as exc:  # the restricted unpickler's refusal (UnpicklingError) or a corrupt file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ErasureError(
            f"{file_words(input_name)} '{os.path.basename(path)}' must hold only tensors (it is loaded with "
            f"torch.load(weights_only=True), never as a full pickle), but loading refused it: {first_line}. "
            "Nothing was loaded. Convert it to .safetensors in a trusted environment, or use the "
            "safetensors release of the eraser.", input_name=input_name) from exc
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    _flatten(_unwrap(obj), "", tensors, metadata)
    if not tensors:
        raise ErasureError(f"{file_words(input_name)} '{os.path.basename(path)}' must contain weight tensors, but "
                           f"it holds none (a {type(obj).__name__}).", input_name=input_name)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return EraserFile(path, shapes, metadata, dtypes={k: str(v.dtype) for k, v in tensors.items()},
                      _tensors=tensors, input_name=input_name)


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping) and len(obj) >= 1:
        wrapped = [k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)]
        if not wrapped or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[wrapped[0]]
    return obj


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), tensors, metadata)
    elif isinstance(obj, (str, int, float, bool)) and prefix:
        metadata[prefix] = str(obj)  # e.g. "epoch": 3 beside the weights


CONFIG_LIMIT = 64 * 1024
"""Most bytes of an ``eraser_config.json`` (Receler's holds two small fields)."""


def _sidecar_config(path: str, input_name: str) -> dict[str, Any]:
    """Receler's ``eraser_config.json`` beside the weights (``{"eraser_type", "eraser_rank"}``): only
    a small JSON file whose real path stays in the weights' own folder (a link out is refused)."""
    folder = os.path.realpath(os.path.dirname(path))
    config_path = os.path.join(os.path.dirname(path), RECELER_CONFIG)
    if not os.path.lexists(config_path):
        return {}
    where = f"'{RECELER_CONFIG}' beside the {input_name}"
    real = os.path.realpath(config_path)
    if os.path.commonpath([real, folder]) != folder:
        raise ErasureError(f"{where} must be a file in the {input_name}'s own folder, but it links outside it. "
                           f"Replace the link with a copy of the file, or remove it.", input_name=input_name)
    if not os.path.isfile(real):
        return {}
    try:
        with open(real, "rb") as f:
            data = f.read(CONFIG_LIMIT + 1)
    except OSError as exc:
        raise ErasureError(f"{where} must be readable, but reading it failed ({shown(str(exc), 200)}). Fix or "
                           "remove it.", input_name=input_name) from exc
    if len(data) > CONFIG_LIMIT:
        raise ErasureError(f"{where} must be at most {CONFIG_LIMIT // 1024} KiB (Receler's holds two fields), but "
                           f"it is larger. Remove it, or keep only eraser_type and eraser_rank in it.",
                           input_name=input_name)
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ErasureError(f"{where} must be valid JSON, but reading it failed ({shown(reason, 120)}). Fix or "
                           "remove it.", input_name=input_name) from None
    return config if isinstance(config, dict) else {}
