"""Causal text encoding over a prefix tree: each distinct token prefix is computed once.

In a causal encoder (CLIP) the hidden state at position ``i`` depends only on tokens ``0..i``,
so prompts that start alike ("Tom Cruise", "Tom Hanks", the start token of every prompt) share
those rows exactly. A pass over a tree holds one row per distinct prefix (a *node*); each node
attends to the keys and values of its own path from the root. Names lists share much: 100
synthetic artist names through their EOT need 374 nodes instead of 446 rows, and every prompt's
start token is one node.

Shapes: ``R`` nodes, ``L`` the deepest path (longest prompt), ``D`` width, ``H`` heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["PrefixTree", "tree_attention"]

DENSE_SCORES = 1 << 22
"""Most attention scores (``heads · R²``, 16 MiB in float32) for which :func:`tree_attention`
scores every node against every node under an ancestor mask (a few large matmuls) instead of
gathering each node's path (``R`` tiny attentions, ~2.5× slower at a few hundred nodes). The dense
form costs ``4 R² D`` flops, a small share of the layer's ``~14 R D²`` while ``R`` is this small."""


@dataclass(frozen=True)
class PrefixTree:
    """``tokens [R]`` each node's token, ``positions [R]`` its position, ``paths [R, L]`` the
    nodes a node attends to (its ancestors and itself, by position; padded with the node
    itself), ``mask [R, L]`` True where ``paths`` is real, ``rows [N, T]`` the node of prompt
    ``n`` at position ``t`` (``-1`` past its end). Nodes are in creation order, so a parent always
    precedes its children."""

    tokens: torch.Tensor
    positions: torch.Tensor
    paths: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]]) -> PrefixTree:
        """The tree of ``sequences`` (token ids, each cut where its rows are no longer needed)."""
        children: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        positions: list[int] = []
        paths: list[list[int]] = []
        width = max((len(s) for s in sequences), default=0)
        rows = torch.full((len(sequences), max(width, 1)), -1, dtype=torch.long)
        for n, seq in enumerate(sequences):
            parent, path = -1, []
            for t, token in enumerate(seq):
                key = (parent, int(token))
                node = children.get(key)
                if node is None:
                    node = children[key] = len(tokens)
                    tokens.append(int(token))
                    positions.append(t)
                    paths.append([*path, node])
                path = paths[node]
                rows[n, t] = parent = node
        depth = max((len(p) for p in paths), default=1)
        padded = torch.tensor([p + [p[-1]] * (depth - len(p)) for p in paths], dtype=torch.long).reshape(-1, depth)
        mask = torch.arange(depth) < torch.tensor([len(p) for p in paths], dtype=torch.long)[:, None]
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                   padded, mask, rows)

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """``[R, R]`` True where node ``i`` attends to node ``j`` (``j`` on ``i``'s path)."""
        out = torch.zeros(len(self), len(self), dtype=torch.bool)
        out[torch.arange(len(self))[:, None].expand_as(self.paths), self.paths] = True
        return out

    @cached_property
    def _biases(self) -> dict[tuple[bool, torch.dtype, torch.device], torch.Tensor]:
        return {}

    def attention_bias(self, dense: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The additive mask of :func:`tree_attention`, 0 where attended and -inf elsewhere: ``[R, R]``
        over :attr:`ancestors` (``dense``) or ``[R, L]`` over :attr:`mask`; built once per dtype
        and device, since every layer of a pass reads the same one."""
        key = (dense, dtype, device)
        if key not in self._biases:
            allowed = (self.ancestors if dense else self.mask).to(device)
            self._biases[key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
                ~allowed, float("-inf"))
        return self._biases[key]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Node rows ``x [R, D]`` back to prompts, ``[N, T, D]`` (zero past each prompt's end)."""
        out = x.new_zeros(*self.rows.shape, x.shape[-1])
        valid = self.rows >= 0
        out[valid] = x[self.rows[valid].to(x.device)]
        return out


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: PrefixTree, heads: int) -> torch.Tensor:
    """Causal multi-head attention of every node over its path: ``q, k, v [R, D]`` → ``[R, D]``
    (before the output projection). Equals a causal pass over each prompt at that prompt's rows."""
    r, d = q.shape
    dense = heads * r * r <= DENSE_SCORES  # every node against every node, non-ancestors masked out
    bias = tree.attention_bias(dense, q.dtype, q.device)
    if dense:
        def per_head(z: torch.Tensor) -> torch.Tensor:  # [R, D] -> [H, R, D/H]
            return z.reshape(r, heads, d // heads).transpose(0, 1)

        a = torch.nn.functional.scaled_dot_product_attention(per_head(q), per_head(k), per_head(v), attn_mask=bias)
        return a.transpose(0, 1).reshape(r, d)
    paths = tree.paths.to(q.device)

    def split(z: torch.Tensor) -> torch.Tensor:  # [R, L, D] -> [R, H, L, D/H]
        return z.reshape(r, z.shape[1], heads, d // heads).transpose(1, 2)

    a = torch.nn.functional.scaled_dot_product_attention(
        split(q[:, None]), split(k[paths]), split(v[paths]), attn_mask=bias[:, None, None, :])
    return a.reshape(r, d)
