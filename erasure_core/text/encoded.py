"""Encoded text and the choice of which token rows act as keys.

``EncodedText`` is what every text encoder returns; ``TokenPick`` names the strategies the papers
use to pick key rows (``research/algorithms.md`` §0 and §11.1):

* ``LAST_SUBJECT``: the last word token only (UCE's current code, SPEED).
* ``LAST_WORD_EOT_PADDING``: the last word, the first EOT and the padding after it, aligned
  position by position between target and anchor (UCE paper-era code, arXiv 2308.14761).
* ``ALL``: every position (RECE, MACE's fusion).
* ``FIRST_EOT``: the first end-of-text token only (TRCE stage 1).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from ..errors import ConceptError

__all__ = ["ROWS", "EncodedText", "LayerStates", "TextEncoder", "TimedEncoder", "TokenPick", "encode", "erase_rows", "preserve_rows",
           "rows_for", "rows_returned"]

ROWS = ("all", "through_eot", "through_last_word")
"""How many token positions a caller needs: ``"all"`` (the whole context), ``"through_eot"``
(each prompt up to and including its first end-of-text token; rows after it are unspecified) or
``"through_last_word"`` (each prompt up to its last word, ``eot_index - 1``, or its start token
for the empty prompt; the EOT row and later ones are unspecified). Each mode covers the next."""


class TokenPick(str, Enum):
    """Which token rows of an encoded prompt become keys of the closed-form edit."""

    LAST_WORD_EOT_PADDING = "last word + EOT + padding"
    LAST_SUBJECT = "last subject token"
    ALL = "all tokens"
    FIRST_EOT = "first EOT"


@dataclass(frozen=True)
class LayerStates:
    """Every layer's rows of a second encoder whose layers a model reads one by one (HiDream's Llama,
    ComfyUI's ``conditioning_llama3``): ``hidden [N, L, T, D]`` float32, with that encoder's own
    ``eot_index [N]`` and ``token_ids [N, T]`` (its tokens are not the main stream's)."""

    hidden: torch.Tensor
    eot_index: torch.Tensor
    token_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.hidden.ndim != 4 or self.eot_index.shape != (self.hidden.shape[0],):
            raise ValueError(f"hidden must be [N, L, T, D] with eot_index [N], got {tuple(self.hidden.shape)} "
                             f"and {tuple(self.eot_index.shape)}")

    @property
    def layers(self) -> int:
        return int(self.hidden.shape[1])

    def layer(self, texts: tuple[str, ...], k: int) -> EncodedText:
        """Layer ``k`` as an :class:`EncodedText` (token picks then work on it as on any encoder)."""
        return EncodedText(texts, self.hidden[:, k], self.eot_index, token_ids=self.token_ids)


@dataclass(frozen=True)
class EncodedText:
    """Per-token hidden states of a batch of prompts.

    ``hidden``: ``[N, T, D]`` float32; ``eot_index``: ``[N]`` position of each prompt's first
    end-of-text token (so the last word is at ``eot_index - 1``, and at 0, the start token, for the
    empty prompt of a CLIP; encoders without a start token, such as T5, put the empty prompt's
    end-of-text at 0, and its "last word" is that row); ``pooled``: optional ``[N, P]``; ``token_ids``: optional ``[N, T]`` (-1 for
    positions that hold an embedding rather than a vocabulary token); ``layered``: per-layer states of
    further encoders by name (``"llama"``), read by models whose text inputs each read one layer.
    """

    texts: tuple[str, ...]
    hidden: torch.Tensor
    eot_index: torch.Tensor
    pooled: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    layered: Mapping[str, LayerStates] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.hidden.ndim != 3 or self.hidden.shape[0] != n:
            raise ValueError(f"hidden must be [{n}, T, D], got {tuple(self.hidden.shape)}")
        if self.eot_index.shape != (n,):
            raise ValueError(f"eot_index must be [{n}], got {tuple(self.eot_index.shape)}")
        if n and (self.eot_index.min() < 0 or self.eot_index.max() >= self.hidden.shape[1]):
            raise ValueError("eot_index must lie in [0, T)")

    @property
    def width(self) -> int:
        return int(self.hidden.shape[-1])

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[N, T]`` bool: True up to and including the first end-of-text token."""
        positions = torch.arange(self.hidden.shape[1], device=self.eot_index.device)
        return positions[None, :] <= self.eot_index[:, None]

    def index(self, text: str) -> int:
        try:
            return self.texts.index(text)
        except ValueError:
            raise KeyError(f"'{text}' was not encoded") from None


class TextEncoder(Protocol):
    """Anything that turns prompts into :class:`EncodedText` (ComfyUI's CLIP, a test encoder).

    An encoder that can stop early sets ``accepts_rows = True`` and takes ``rows=`` (``"all"`` or
    ``"through_eot"``; also ``"through_last_word"`` where it sets ``accepts_last_word = True``); it
    may still return more rows than asked (a bidirectional encoder runs its real length). Callers go through :func:`encode`, which asks only encoders that accept it."""

    def __call__(self, texts: Sequence[str]) -> EncodedText: ...


def rows_returned(encoder: TextEncoder, rows: str) -> str:
    """The rows mode :func:`encode` gets back from ``encoder`` for a ``rows`` request: all rows where
    the encoder cannot stop early, through the EOT where it stops only there."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    if rows == "all" or not getattr(encoder, "accepts_rows", False):
        return "all"
    if rows == "through_last_word" and not getattr(encoder, "accepts_last_word", False):
        return "through_eot"  # an encoder that stops only at the EOT: one row more, same values
    return rows


def encode(encoder: TextEncoder, texts: Sequence[str], rows: str = "all") -> EncodedText:
    """``encoder(texts)``, asking for only ``rows`` where the encoder accepts the request."""
    got = rows_returned(encoder, rows)
    return encoder(texts) if got == "all" else encoder(texts, rows=got)  # type: ignore[call-arg]


class TimedEncoder:
    """Wraps a ``TextEncoder`` and adds up the seconds spent in it (rows requests pass through)."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.accepts_rows = bool(getattr(encoder, "accepts_rows", False))
        self.accepts_last_word = bool(getattr(encoder, "accepts_last_word", False))
        self.seconds = 0.0

    def __call__(self, texts: Sequence[str], rows: str = "all") -> EncodedText:
        started = time.perf_counter()
        try:
            return encode(self.encoder, texts, rows)
        finally:
            self.seconds += time.perf_counter() - started


def rows_for(pick: TokenPick) -> str:
    """The rows a token pick reads: single rows at or before the first EOT need no later position
    (CLIP is causal, so rows up to a prompt's EOT do not depend on what follows); the last subject
    token does not even need the EOT row."""
    if pick is TokenPick.LAST_SUBJECT:
        return "through_last_word"
    return "through_eot" if pick is TokenPick.FIRST_EOT else "all"


def _last_word(enc: EncodedText, i: int) -> int:
    return max(int(enc.eot_index[i]) - 1, 0)


def erase_rows(
    enc: EncodedText, pairs: Sequence[tuple[str, str]], pick: TokenPick
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key rows of each target and the matching rows of its anchor.

    Returns ``(target_keys [R, D], anchor_keys [R, D])``; row r of the target maps to row r of the
    anchor. Both prompts of every pair must be in ``enc``.
    """
    t_rows: list[torch.Tensor] = []
    a_rows: list[torch.Tensor] = []
    length = enc.hidden.shape[1]
    for target, anchor in pairs:
        t, a = enc.index(target), enc.index(anchor)
        ht, ha = enc.hidden[t], enc.hidden[a]
        if pick is TokenPick.LAST_SUBJECT:
            t_rows.append(ht[_last_word(enc, t)][None])
            a_rows.append(ha[_last_word(enc, a)][None])
        elif pick is TokenPick.FIRST_EOT:
            t_rows.append(ht[int(enc.eot_index[t])][None])
            a_rows.append(ha[int(enc.eot_index[a])][None])
        elif pick is TokenPick.ALL:
            t_rows.append(ht)
            a_rows.append(ha)
        elif pick is TokenPick.LAST_WORD_EOT_PADDING:
            # UCE train_erase.py: align from the last word on; both blocks have T - farthest rows.
            ft, fa = _last_word(enc, t), _last_word(enc, a)
            farthest = max(ft, fa)
            t_rows.append(ht[ft : length - (farthest - ft)])
            a_rows.append(ha[fa : length - (farthest - fa)])
        else:
            raise ConceptError(f"unknown token strategy {pick!r}", input_name="token_pick")
    if not t_rows:
        width = enc.width
        return enc.hidden.new_zeros(0, width), enc.hidden.new_zeros(0, width)
    return torch.cat(t_rows), torch.cat(a_rows)


def preserve_rows(enc: EncodedText, prompts: Sequence[str], pick: TokenPick) -> torch.Tensor:
    """Key rows of the prompts whose outputs must not move, ``[R, D]``.

    Strategies that key on a single token preserve that token; the others preserve every position
    of the prompt, as UCE's paper-era code does for its preserve set.
    """
    rows: list[torch.Tensor] = []
    for prompt in prompts:
        i = enc.index(prompt)
        if pick is TokenPick.LAST_SUBJECT:
            rows.append(enc.hidden[i, _last_word(enc, i)][None])
        elif pick is TokenPick.FIRST_EOT:
            rows.append(enc.hidden[i, int(enc.eot_index[i])][None])
        else:
            rows.append(enc.hidden[i])
    if not rows:
        return enc.hidden.new_zeros(0, enc.width)
    return torch.cat(rows)
