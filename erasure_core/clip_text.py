"""A CLIP text encoder in plain torch, for the CLI demo, benchmarks and tests.

ComfyUI users never need this: in a graph the pack encodes with the CLIP the user connected.
It exists so the core can run end to end without ComfyUI and without downloads: a byte-level
BPE tokenizer that reads CLIP's merges file (shipped in the ``open-clip-torch`` wheel, or any
``merges.txt``), and the CLIP ViT-L/14 text transformer shape (Radford et al. 2021) with seeded
random weights, or any smaller width for tests.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .errors import ConfigError
from .text import EncodedText

__all__ = ["ROWS", "BPETokenizer", "ClipTextConfig", "ClipTextEncoder", "find_merges_file"]

ROWS = ("all", "through_eot")
"""Values of ``ClipTextEncoder.__call__(..., rows=)``."""

START, END = "<|startoftext|>", "<|endoftext|>"
_WORDS = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+",
    re.IGNORECASE,
)


def find_merges_file() -> str:
    """Path of CLIP's BPE merges inside the installed open-clip-torch wheel."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
            if os.path.exists(path):
                return path
    raise ConfigError(
        "the CLIP tokenizer needs its BPE merges file, but none was found. Run "
        "'pip install open-clip-torch' (it ships the file) or pass the path of a CLIP merges.txt.",
        input_name="merges",
    )


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """Reversible byte -> printable character map used by byte-level BPE (GPT-2, CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class BPETokenizer:
    """CLIP's tokenizer: lower-cased words, byte-level BPE with ``</w>`` word ends, 77 tokens."""

    def __init__(self, merges_path: str | None = None, context_length: int = 77):
        path = merges_path or find_merges_file()
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The CLIP file starts with a version line and holds 48,894 merges (49408 - 256*2 - 2).
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1] if m.strip()]
        alphabet = list(_byte_alphabet().values())
        vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
        self._cache[word] = parts
        return parts

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        text = " ".join(html.unescape(text).split()).lower()
        alphabet = _byte_alphabet()
        out: list[int] = []
        for word in _WORDS.findall(text):
            mapped = "".join(alphabet[b] for b in word.encode("utf-8"))
            out.extend(self.encoder[p] for p in self._bpe(mapped))
        return out

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N, 77], eot_index [N])``, padded with the end token as SD1.x's CLIP is."""
        rows, eots = [], []
        for text in texts:
            body = self.ids(text)[: self.context_length - 2]
            row = [self.start_id, *body, self.end_id]
            eots.append(len(row) - 1)
            rows.append(row + [self.end_id] * (self.context_length - len(row)))
        return torch.tensor(rows), torch.tensor(eots)


@dataclass(frozen=True)
class ClipTextConfig:
    """Shape of the text transformer; the defaults are CLIP ViT-L/14's (SD1.x)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = self.fc1(self.ln_2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))  # CLIP's quick-GELU


class ClipTextEncoder(nn.Module):
    """Causal CLIP text transformer; ``encoder(texts)`` returns :class:`EncodedText`.

    Weights are random from ``seed`` (no downloads); encoding runs in ``batch_size`` chunks.
    """

    def __init__(self, config: ClipTextConfig | None = None, tokenizer: BPETokenizer | None = None,
                 *, seed: int = 0, batch_size: int = 64):
        super().__init__()
        self.config = config or ClipTextConfig()
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        self.blocks = nn.ModuleList(_Block(c.width, c.heads) for _ in range(c.layers))
        self.final_ln = nn.LayerNorm(c.width)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:  # norm scales 1, biases 0: every value comes from `seed`
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = torch.full((t, t), float("-inf"), device=ids.device).triu(1)
        x = self.token_embedding(ids) + self.position_embedding[:t]
        for block in self.blocks:
            x = block(x, mask)
        return self.final_ln(x)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], *, rows: str = "all") -> EncodedText:  # type: ignore[override]
        """Encode ``texts``; ``rows`` says how many token positions to compute.

        ``"all"``: every position of the context (``[N, 77, D]`` for CLIP). ``"through_eot"``:
        ``[N, max(eot) + 1, D]``, for callers that read no row after a prompt's first
        end-of-text token (token picks 'last subject token' and 'first EOT'): every row up to a
        prompt's EOT equals the full encoding's (the model is causal); rows after it may be zero,
        because each length-sorted chunk stops at its own longest prompt. Prompts are encoded in
        ``batch_size`` chunks sorted by length and returned in the order given.
        """
        if self.tokenizer is None:
            raise ConfigError("this encoder has no tokenizer; pass one or call forward(ids).",
                              input_name="tokenizer")
        if rows not in ROWS:
            raise ConfigError(f"rows must be one of {ROWS}, but got {rows!r}.", input_name="rows")
        ids, eot = self.tokenizer(texts)
        device = self.position_embedding.device
        length = ids.shape[1] if rows == "all" else int(eot.max()) + 1
        ids = ids[:, :length].to(device)
        hidden = torch.empty(len(texts), length, self.config.width, device=device)
        order = torch.argsort(eot, stable=True)  # similar lengths share a chunk
        for start in range(0, len(texts), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # through_eot: each chunk stops at its own longest prompt's EOT (rows after a prompt's
            # EOT are not read by the callers of this mode, and are left at zero)
            stop = length if rows == "all" else int(eot[chunk].max()) + 1
            chunk = chunk.to(device)
            hidden[chunk, :stop] = self.forward(ids[chunk, :stop])
            hidden[chunk, stop:] = 0
        return EncodedText(tuple(texts), hidden.float(), eot, token_ids=ids.cpu())
