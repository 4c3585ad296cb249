"""Receler's erasers: a bottleneck adapter after every cross-attention (algorithms.md §6).

Receler changes each transformer block to ``x = a + E(a) + x`` with ``a = attn2(norm2(x), ctx)``
and ``E(a) = up(GELU(down(a)))`` (``down: Linear(dim → r)``, ``up: Linear(r → dim)``, both with
bias) [code: Receler ``receler/erasers/utils.py``]. ``BlockAdapters`` is the attention-output
hook: called with the attention output ``a`` and the block being run, it returns
``a + scale · E(a)`` for blocks that have an adapter and ``a`` unchanged elsewhere. It holds no
ComfyUI objects; the adapter layer maps block names and registers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ErasureError

__all__ = ["Adapter", "BlockAdapters", "parse_receler"]

_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


@dataclass(frozen=True)
class Adapter:
    """``E(a) = up(GELU(down(a)))``; weights as Receler saves them (float32 on the CPU)."""

    down_weight: torch.Tensor  # [r, dim]
    down_bias: torch.Tensor  # [r]
    up_weight: torch.Tensor  # [dim, r]
    up_bias: torch.Tensor  # [dim]

    @property
    def rank(self) -> int:
        return int(self.down_weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.down_weight.shape[1])

    def to(self, device: torch.device) -> Adapter:
        return Adapter(*(t.to(device) for t in (self.down_weight, self.down_bias, self.up_weight, self.up_bias)))

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """``E(a)`` for ``a: [..., dim]`` (weights on ``a``'s device), computed in float32,
        returned in ``a``'s dtype."""
        h = torch.nn.functional.linear(a.float(), self.down_weight, self.down_bias)
        out = torch.nn.functional.linear(torch.nn.functional.gelu(h), self.up_weight, self.up_bias)
        return out.to(a.dtype)


def parse_receler(tensors: Mapping[str, torch.Tensor]) -> dict[str, Adapter]:
    """``{diffusers block prefix: Adapter}`` from ``{block}.down.weight`` (Receler
    ``eraser_weights.pt``, flattened) or ``{block}.adapter.down.weight`` (erase-eval) keys."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((p for p in _PARTS if key.endswith("." + p)), None)
        if suffix is None:
            raise ErasureError(f"Receler eraser keys must end with {_PARTS}, but got '{key}'.", input_name="eraser")
        block = key[: -len(suffix) - 1].removesuffix(".adapter")
        parts.setdefault(block, {})[suffix] = tensor.float()
    adapters = {}
    for block, p in parts.items():
        missing = [name for name in _PARTS if name not in p]
        if missing:
            raise ErasureError(f"Receler adapter '{block}' must have {_PARTS}, but lacks {missing}.",
                               input_name="eraser")
        dw, db, uw, ub = (p[name] for name in _PARTS)
        if not (dw.ndim == 2 and uw.ndim == 2 and db.shape == (dw.shape[0],) and uw.shape == (dw.shape[1], dw.shape[0])
                and ub.shape == (dw.shape[1],)):
            raise ErasureError(
                f"Receler adapter '{block}' must have down [r, dim], up [dim, r] and matching biases, but got "
                f"down {tuple(dw.shape)}, up {tuple(uw.shape)}.", input_name="eraser")
        adapters[block] = Adapter(dw, db, uw, ub)
    return adapters


class BlockAdapters:
    """The attn2-output hook: ``a + scale · E_block(a)`` where ``block`` has an adapter.

    ``adapters`` is keyed by ``(kind, index)``, the ``extra_options["block"]`` ComfyUI's UNet
    passes (``("input", 1)``, ``("middle", 0)``, ``("output", 3)``); every transformer block of
    that spatial transformer gets it (one per block in SD1.x/SD2.x). Immutable: ComfyUI
    deep-copies model options on every clone, so it returns itself instead of copying tensors.
    """

    def __init__(self, adapters: Mapping[tuple[str, int], Adapter], scale: float, label: str = ""):
        self.adapters = dict(adapters)
        self.scale = float(scale)
        self.label = label
        self._moved: dict[torch.device, dict[tuple[str, int], Adapter]] = {}  # one copy per device, not per call

    def __call__(self, n: torch.Tensor, extra_options: Mapping[str, Any]) -> torch.Tensor:
        block = extra_options.get("block")
        adapter = self.adapters.get(tuple(block)) if block is not None else None
        if adapter is None or self.scale == 0.0:
            return n
        if n.shape[-1] != adapter.dim:
            raise ErasureError(f"the Receler adapter for block {tuple(block)} expects width {adapter.dim}, but the "
                               f"attention output is {n.shape[-1]} wide. Use the eraser made for this model.",
                               input_name="eraser")
        moved = self._moved.get(n.device)
        if moved is None:
            moved = self._moved[n.device] = {b: a.to(n.device) for b, a in self.adapters.items()}
        return n + self.scale * moved[tuple(block)](n)

    def __deepcopy__(self, memo: dict) -> BlockAdapters:
        return self
