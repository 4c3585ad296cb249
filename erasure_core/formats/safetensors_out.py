"""Safetensors files written byte for byte the same for the same tensors and metadata.

The ``safetensors`` package writes its ``__metadata__`` from a hash map whose order changes from
one process to the next, so two runs on the same inputs give different bytes (checked with
safetensors 0.8). The format is small (``u64`` little-endian header length, a JSON header of
dtype/shape/offsets per tensor, then the raw little-endian data), so this module writes it with
sorted keys; ``safetensors.safe_open`` and ComfyUI read the result as any other file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import replace_atomically

__all__ = ["safetensors_bytes", "write_atomic"]

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _raw(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    # bytes in memory order; torch tensors on CPU are little-endian on every platform torch supports
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The file's bytes: tensors in name order, header JSON with sorted keys and no spaces."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store dtype {t.dtype} of '{name}' in safetensors")
        data = _raw(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (no partial file)."""
    replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
