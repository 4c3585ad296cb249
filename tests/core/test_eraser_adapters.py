"""Receler's adapter E(a) = up(GELU(down(a))) as an attention-output hook keyed by block."""

from __future__ import annotations

import copy

import pytest
import torch

from erasure_core import ErasureError
from erasure_core.edit.adapters import BlockAdapters, parse_receler


def _weights(dim=16, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"down.weight": torch.randn(rank, dim, generator=g), "down.bias": torch.randn(rank, generator=g),
            "up.weight": torch.randn(dim, rank, generator=g), "up.bias": torch.randn(dim, generator=g)}


def test_hook_adds_scaled_adapter_output_only_on_its_block():
    w = _weights()
    adapters = parse_receler({f"down_blocks.0.attentions.0.{k}": v for k, v in w.items()})
    hook = BlockAdapters({("input", 1): adapters["down_blocks.0.attentions.0"]}, scale=0.5)
    a = torch.randn(2, 5, 16)
    expected = a + 0.5 * (torch.nn.functional.gelu(a @ w["down.weight"].T + w["down.bias"]) @ w["up.weight"].T
                          + w["up.bias"])
    torch.testing.assert_close(hook(a, {"block": ("input", 1)}), expected)
    assert hook(a, {"block": ("output", 1)}) is a and hook(a, {}) is a
    assert copy.deepcopy(hook) is hook  # ComfyUI deep-copies model options on every clone
    half = hook(a.half(), {"block": ("input", 1)})
    assert half.dtype == torch.float16


def test_adapter_keys_and_bad_shapes():
    w = _weights()
    adapters = parse_receler({f"mid_block.attentions.0.adapter.{k}": v for k, v in w.items()})
    assert list(adapters) == ["mid_block.attentions.0"] and adapters["mid_block.attentions.0"].rank == 4
    with pytest.raises(ErasureError, match="lacks"):
        parse_receler({"mid_block.attentions.0.down.weight": w["down.weight"]})
    with pytest.raises(ErasureError, match="down \\[r, dim\\]"):
        parse_receler({f"b.{k}": (v if k != "up.weight" else v.T) for k, v in w.items()})
    hook = BlockAdapters({("middle", 0): adapters["mid_block.attentions.0"]}, 1.0)
    with pytest.raises(ErasureError, match="width 16"):
        hook(torch.zeros(1, 2, 8), {"block": ("middle", 0)})
