"""Tiny seeded stand-ins for a diffusion model and its text encoder (no weights, no network)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import torch

from erasure_core import AttentionSite
from erasure_core.text.clip import ClipTextConfig, ClipTextEncoder

PREFIX = "diffusion_model."
BLOCKS = ("input_blocks.1.1", "middle_block.1", "output_blocks.3.1")


class WordTokenizer:
    """Whitespace words hashed into a small vocabulary; start=0, end=1 (also the padding)."""

    def __init__(self, vocab_size: int = 512, context_length: int = 8):
        self.vocab_size, self.context_length = vocab_size, context_length

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, eots = [], []
        for text in texts:
            words = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.lower().split()]
            row = [0, *words[: self.context_length - 2], 1]
            eots.append(len(row) - 1)
            rows.append(row + [1] * (self.context_length - len(row)))
        return torch.tensor(rows), torch.tensor(eots)


def tiny_encoder(width: int = 32, context_length: int = 8, seed: int = 0) -> ClipTextEncoder:
    config = ClipTextConfig(width=width, layers=2, heads=2, vocab_size=512, context_length=context_length)
    return ClipTextEncoder(config, WordTokenizer(512, context_length), seed=seed)


def tiny_sites(width: int = 32, d_outs: Sequence[int] = (16, 24, 16), seed: int = 0) -> list[AttentionSite]:
    """K and V sites named like ComfyUI's SD1.x keys, seeded, in float32."""
    gen = torch.Generator().manual_seed(seed)
    sites = []
    for block, d_out in zip(BLOCKS, d_outs, strict=False):
        for proj in ("k", "v"):
            key = f"{PREFIX}{block}.transformer_blocks.0.attn2.to_{proj}.weight"
            sites.append(AttentionSite(key, torch.randn(d_out, width, generator=gen) / width**0.5))
    return sites


def edited_weight(site: AttentionSite, patch, strength: float = 1.0) -> torch.Tensor:
    return site.weight.double() + strength * patch[site.key].dense().double()


class Payload:
    """Rebuilding this would call os.system: what a malicious .pt file does."""

    def __reduce__(self):
        return (os.system, ("echo never",))
