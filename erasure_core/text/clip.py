"""A CLIP text encoder in plain torch, for the CLI demo, benchmarks and tests.

ComfyUI users never need this: in a graph the pack encodes with the CLIP the user connected.
It exists so the core can run end to end without ComfyUI and without downloads: a byte-level
BPE tokenizer that reads CLIP's merges file (shipped in the ``open-clip-torch`` wheel, or any
``merges.txt``), and the CLIP ViT-L/14 text transformer shape (Radford et al. 2021) with seeded
random weights, or any smaller width for tests.
"""

from __future__ import annotations

import gzip
import heapq
import html
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import ConfigError
from .encoded import ROWS, EncodedText
from .prefix_tree import PrefixTree, tree_attention

__all__ = ["ROWS", "BPETokenizer", "ClipTextConfig", "ClipTextEncoder", "find_merges_file"]

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

    def __init__(self, merges_path: str | None = None, context_length: int = 77, pad_id: int | None = None):
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
        # after the end token: the end token again (CLIP-L in SD1.x/SDXL) or id 0 (OpenCLIP's, as
        # ComfyUI pads SD2.x's and SDXL's second encoder)
        self.pad_id = self.end_id if pad_id is None else pad_id
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[str]:
        """Byte-level BPE of one word: always the lowest-ranked adjacent pair, leftmost first.

        A heap of candidate pairs over a linked list of parts, so a word of n characters costs
        O(n log n) (the textbook loop rescans every pair after each merge: O(n²), which let one
        long word block ComfyUI's HTTP handler for minutes)."""
        if word in self._cache:
            return self._cache[word]
        parts: list[str | None] = list(word[:-1]) + [word[-1] + "</w>"]
        nxt = list(range(1, len(parts))) + [-1]
        prv = list(range(-1, len(parts) - 1))
        heap = [(rank, i, parts[i], parts[i + 1]) for i in range(len(parts) - 1)
                if (rank := self.ranks.get((parts[i], parts[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if parts[i] is not None else -1
            if j < 0 or parts[i] != left or parts[j] != right:
                continue  # stale: one side was merged since this pair was pushed
            parts[i] = left + right
            parts[j] = None
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            for a in (prv[i], i):
                b = nxt[a] if a >= 0 else -1
                if b >= 0 and (rank := self.ranks.get((parts[a], parts[b]))) is not None:
                    heapq.heappush(heap, (rank, a, parts[a], parts[b]))
        merged = [part for part in parts if part is not None]
        if len(self._cache) < 100_000:
            self._cache[word] = merged
        return merged

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
        """``(ids [N, 77], eot_index [N])``, padded with ``pad_id`` (the end token by default)."""
        rows, eots = [], []
        for text in texts:
            body = self.ids(text)[: self.context_length - 2]
            row = [self.start_id, *body, self.end_id]
            eots.append(len(row) - 1)
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        return torch.tensor(rows), torch.tensor(eots)


@dataclass(frozen=True)
class ClipTextConfig:
    """Shape of the text transformer; the defaults are CLIP ViT-L/14's (SD1.x).

    ``activation``: ``quick_gelu`` (OpenAI CLIP) or ``gelu`` (OpenCLIP ViT-H/bigG); ``final_norm``:
    apply the final LayerNorm (SD1.x reads the last layer normed; SD2.x/SDXL read the penultimate
    layer's hidden state without it, which is a model of ``layers - 1`` blocks and no final norm).
    """

    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "quick_gelu"
    final_norm: bool = True


TREE_MAX_LENGTH = 32
"""Through-EOT requests up to this many positions run as a prefix tree (``prefix_tree``); the
gather of each node's path costs ``R × L`` rows, so longer prompts go through ``forward_groups``."""


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.heads = heads
        self.quick_gelu = activation == "quick_gelu"
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)  # holds the weights
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One residual block; returns the new ``x`` and this block's keys and values.

        ``prefix``: keys and values ``[1, P, D]`` of positions that precede ``x`` and are the same
        for every row of the batch (the start token), attended to but not recomputed."""
        b, t, d = x.shape
        q, k, v = nn.functional.linear(self.ln_1(x), self.attn.in_proj_weight,
                                       self.attn.in_proj_bias).chunk(3, dim=-1)
        own = (k, v)
        if prefix is not None:
            k = torch.cat([prefix[0].expand(b, -1, -1), k], dim=1)
            v = torch.cat([prefix[1].expand(b, -1, -1), v], dim=1)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, z.shape[1], self.heads, d // self.heads).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return self._mlp(x + self.attn.out_proj(a.transpose(1, 2).reshape(b, t, d))), own

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.ln_2(x))
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else nn.functional.gelu(h)  # quick-GELU: OpenAI CLIP
        return x + self.fc2(h)

    def forward_packed(self, x: torch.Tensor, shapes: Sequence[tuple[int, int]],
                       masks: Sequence[torch.Tensor], prefix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The block over several batches of different lengths at once.

        ``x [R, D]`` holds the rows of batch ``g`` (``shapes[g] = (n, t)``, prompt-major) one batch
        after the other. Projections and the MLP run once over all ``R`` rows (on a CPU a pass is
        bound by reading the weights, so one pass beats one per batch); attention runs per batch,
        each after the shared ``prefix`` keys and values."""
        d = x.shape[-1]
        q, k, v = nn.functional.linear(self.ln_1(x), self.attn.in_proj_weight,
                                       self.attn.in_proj_bias).chunk(3, dim=-1)
        out, start = [], 0
        for (n, t), mask in zip(shapes, masks, strict=True):
            rows = slice(start, start + n * t)
            start += n * t

            def heads(z: torch.Tensor, p: torch.Tensor | None = None, n: int = n, t: int = t) -> torch.Tensor:
                z = z.reshape(n, t, d)
                if p is not None:
                    z = torch.cat([p.expand(n, -1, -1), z], dim=1)
                return z.reshape(n, z.shape[1], self.heads, d // self.heads).transpose(1, 2)

            a = nn.functional.scaled_dot_product_attention(
                heads(q[rows]), heads(k[rows], prefix[0]), heads(v[rows], prefix[1]), attn_mask=mask)
            out.append(a.transpose(1, 2).reshape(n * t, d))
        return self._mlp(x + self.attn.out_proj(torch.cat(out)))

    def forward_tree(self, x: torch.Tensor, tree: PrefixTree) -> torch.Tensor:
        """The block over the nodes ``x [R, D]`` of a prefix tree (each attends to its path)."""
        q, k, v = nn.functional.linear(self.ln_1(x), self.attn.in_proj_weight,
                                       self.attn.in_proj_bias).chunk(3, dim=-1)
        return self._mlp(x + self.attn.out_proj(tree_attention(q, k, v, tree, self.heads)))


class ClipTextEncoder(nn.Module):
    """Causal CLIP text transformer; ``encoder(texts)`` returns :class:`EncodedText`.

    Weights are random from ``seed`` (no downloads); encoding runs ``batch_size`` prompts at a time.
    """

    accepts_rows = True  # __call__(texts, rows=...): see TextEncoder
    accepts_last_word = True

    def __init__(self, config: ClipTextConfig | None = None, tokenizer: BPETokenizer | None = None,
                 *, seed: int = 0, batch_size: int = 256):
        super().__init__()
        self.config = config or ClipTextConfig()
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        if c.activation not in ("quick_gelu", "gelu"):
            raise ConfigError(f"activation must be 'quick_gelu' or 'gelu', but got {c.activation!r}.",
                              input_name="activation")
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, c.activation) for _ in range(c.layers))
        self.final_ln = nn.LayerNorm(c.width)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:  # norm scales 1, biases 0: every value comes from `seed`
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[N, T, D]`` of token ids ``[N, T]``."""
        n, t = ids.shape
        if t > 1 and bool((ids[:, 0] == ids[0, 0]).all()):
            return self.forward_groups([ids])[0]
        return self.forward_embeddings(self.token_embedding(ids) + self.position_embedding[:t])

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states from input embeddings ``[N, T, D]`` (tokens plus positions), out of
        place: gradients flow to ``x`` (soft-prompt attacks splice trainable rows into it)."""
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        for block in self.blocks:
            x = block(x, mask)[0]
        return self.final_ln(x) if self.config.final_norm else x

    def forward_groups(self, groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Final hidden states of several id batches ``[n_g, t_g]`` (lengths may differ, ``t_g > 1``)
        whose rows all start with the same token (CLIP's start token), in one pass per layer.

        The start position is computed once and shared: the model is causal, so its hidden states
        do not depend on the rest of a prompt (a short prompt spends a sixth of its work there).
        The other rows of every batch are packed without padding, so the weights are read once
        per layer for all of them."""
        first = groups[0][0, 0]
        x0 = self.token_embedding(first.reshape(1, 1)) + self.position_embedding[:1]
        shapes = [(g.shape[0], g.shape[1] - 1) for g in groups]
        x = torch.cat([(self.token_embedding(g[:, 1:]) + self.position_embedding[1 : g.shape[1]]).flatten(0, 1)
                       for g in groups])
        # row i of a batch is position i + 1: it sees the start token and positions 1 .. i + 1
        masks = [torch.full((t, t + 1), float("-inf"), device=x.device).triu(2) for _, t in shapes]
        for block in self.blocks:
            x0, start = block(x0, None)
            x = block.forward_packed(x, shapes, masks, start)
        if self.config.final_norm:
            x0, x = self.final_ln(x0), self.final_ln(x)
        out, offset = [], 0
        for n, t in shapes:
            body = x[offset : offset + n * t].reshape(n, t, -1)
            offset += n * t
            out.append(torch.cat([x0.expand(n, -1, -1), body], dim=1))
        return out

    def forward_tree(self, tree: PrefixTree) -> torch.Tensor:
        """Final hidden states ``[R, D]`` of the nodes of a prefix tree (one row per distinct
        prefix; ``tree.gather`` gives each prompt's rows)."""
        device = self.position_embedding.device
        x = self.token_embedding(tree.tokens.to(device)) + self.position_embedding[tree.positions.to(device)]
        for block in self.blocks:
            x = block.forward_tree(x, tree)
        return self.final_ln(x) if self.config.final_norm else x

    def _passes(self, eot: torch.Tensor) -> list[torch.Tensor]:
        """Index sets of at most ``batch_size`` prompts, similar lengths together."""
        return list(torch.argsort(eot, stable=True).split(self.batch_size))

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], *, rows: str = "all") -> EncodedText:  # type: ignore[override]
        """Encode ``texts``; ``rows`` says how many token positions to compute.

        ``"all"``: every position of the context (``[N, 77, D]`` for CLIP). ``"through_eot"``:
        ``[N, max(eot) + 1, D]``, for callers that read no row after a prompt's first
        end-of-text token (token picks 'last subject token' and 'first EOT'): every row up to a
        prompt's EOT equals the full encoding's (the model is causal); rows after it are zero,
        because prompts of each length stop at their own EOT. Prompts are sorted by length and
        encoded ``batch_size`` at a time (one pass per layer for all lengths in a pass, see
        :meth:`forward_groups`; up to ``TREE_MAX_LENGTH`` positions, one prefix tree per pass,
        prompts in token order: :meth:`forward_tree`), and returned in the order given.
        ``"through_last_word"``: as ``"through_eot"`` without the EOT row (zero; the start token
        for the empty prompt), where the prompts fit a prefix tree.
        """
        if self.tokenizer is None:
            raise ConfigError("this encoder has no tokenizer; pass one or call forward(ids).",
                              input_name="tokenizer")
        if rows not in ROWS:
            raise ConfigError(f"rows must be one of {ROWS}, but got {rows!r}.", input_name="rows")
        device = self.position_embedding.device
        if not texts:  # nothing to encode: an empty batch of the full width
            c = self.config
            return EncodedText((), torch.zeros(0, c.context_length if rows == "all" else 1, c.width),
                               torch.zeros(0, dtype=torch.long),
                               token_ids=torch.zeros(0, c.context_length, dtype=torch.long))
        ids, eot = self.tokenizer(texts)
        length = ids.shape[1] if rows == "all" else int(eot.max()) + 1
        ids = ids[:, :length].to(device)
        hidden = torch.zeros(len(texts), length, self.config.width, device=device)
        if rows != "all" and length <= TREE_MAX_LENGTH:
            # each prompt through its EOT, or through its last word (the start token for ""); passes
            # of prompts in token order, so prompts that share a prefix share a pass
            stop = (eot + 1) if rows == "through_eot" else eot.clamp_min(1)
            # token lists read once on the host (per-prompt reads of a device tensor each sync it)
            seqs = [row[:end] for row, end in zip(ids.tolist(), stop.tolist(), strict=True)]
            order = sorted(range(len(texts)), key=seqs.__getitem__)
            for first in range(0, len(texts), self.batch_size):
                part = order[first : first + self.batch_size]
                tree = PrefixTree.build([seqs[i] for i in part])
                out = tree.gather(self.forward_tree(tree))
                hidden[torch.tensor(part, device=device), : out.shape[1]] = out
            return EncodedText(tuple(texts), hidden.float(), eot, token_ids=ids.cpu())
        for chunk in self._passes(eot):
            if rows == "all":
                parts = [chunk]
            else:  # one batch per prompt length, each stopping at its EOT: no padding rows
                stops = eot[chunk]
                parts = list(chunk.split(torch.unique_consecutive(stops, return_counts=True)[1].tolist()))
            stops = [length if rows == "all" else int(eot[part[0]]) + 1 for part in parts]
            groups = [ids[part.to(device), :stop] for part, stop in zip(parts, stops, strict=True)]
            if all(stop > 1 for stop in stops) and bool(torch.cat([g[:, 0] for g in groups]).eq(groups[0][0, 0]).all()):
                encoded = self.forward_groups(groups)
            else:
                encoded = [self.forward(g) for g in groups]
            for part, stop, h in zip(parts, stops, encoded, strict=True):
                hidden[part.to(device), :stop] = h
        return EncodedText(tuple(texts), hidden.float(), eot, token_ids=ids.cpu())
