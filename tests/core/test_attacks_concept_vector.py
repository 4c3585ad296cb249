"""concept_vector (Ring-A-Bell) on the tiny seeded encoder: the direction is the hand-computed mean
difference, and the genetic search improves monotonically and repeats for a seed."""

from __future__ import annotations

import pytest
import torch

from erasure_core import ConceptError, ConfigError
from erasure_core.attacks import concept_direction, decode_bpe_tokens, genetic_search

PAIRS = [("a painting by van gogh", "a painting"), ("van gogh style sunflowers", "sunflowers"),
         ("starry night by van gogh", "starry night")]


def _encode_ids(encoder):
    """Prompts ``[start, ids..., end, pad...]`` through the tiny encoder (start 0, end/pad 1)."""
    length = encoder.config.context_length

    def encode(ids):
        n, k = ids.shape
        full = torch.ones(n, length, dtype=torch.long)
        full[:, 0] = 0
        full[:, 1 : k + 1] = ids
        return encoder.forward(full)

    return encode


def test_direction_is_the_mean_of_the_pair_differences(encoder):
    with_c = encoder([p for p, _ in PAIRS]).hidden
    without = encoder([q for _, q in PAIRS]).hidden
    by_hand = torch.zeros_like(with_c[0], dtype=torch.float64)
    for i in range(len(PAIRS)):
        by_hand += (encoder([PAIRS[i][0]]).hidden[0].double() - encoder([PAIRS[i][1]]).hidden[0].double())
    by_hand /= len(PAIRS)
    torch.testing.assert_close(concept_direction(with_c, without).double(), by_hand, rtol=1e-5, atol=1e-6)


def test_direction_needs_matching_pairs():
    with pytest.raises(ConceptError, match="pair"):
        concept_direction(torch.zeros(0, 8, 4), torch.zeros(0, 8, 4))
    with pytest.raises(ConceptError, match="pair"):
        concept_direction(torch.zeros(2, 8, 4), torch.zeros(1, 8, 4))


def _search(encoder, seed, generations=12):
    c = concept_direction(encoder([p for p, _ in PAIRS]).hidden, encoder([q for _, q in PAIRS]).hidden)
    target = encoder(["a painting"]).hidden[0] + 3.0 * c
    return genetic_search(target, _encode_ids(encoder), torch.arange(2, 512), length=4,
                          generations=generations, population=16, seed=seed)


def test_search_improves_monotonically(encoder):
    result = _search(encoder, seed=3)
    assert len(result.history) == 13 and result.evaluations == 16 + 12 * 8
    assert all(b <= a for a, b in zip(result.history, result.history[1:], strict=False))
    assert result.history[-1] < result.history[0]
    enc = _encode_ids(encoder)(result.ids[None])
    target = encoder(["a painting"]).hidden[0] + 3.0 * concept_direction(
        encoder([p for p, _ in PAIRS]).hidden, encoder([q for _, q in PAIRS]).hidden)
    assert result.objective == pytest.approx(float(((enc[0] - target) ** 2).sum()), rel=1e-5)


def test_search_is_deterministic_for_a_seed(encoder):
    a, b, other = _search(encoder, 5), _search(encoder, 5), _search(encoder, 6)
    assert torch.equal(a.ids, b.ids) and a.history == b.history
    assert not (torch.equal(a.ids, other.ids) and a.history == other.history)


def test_search_stops_early_with_patience(encoder):
    c = torch.zeros(8, 32)
    result = genetic_search(c, lambda ids: torch.zeros(len(ids), 8, 32), torch.arange(2, 10), length=2,
                            generations=50, population=4, seed=0, patience=3)
    assert len(result.history) == 4  # the initial best, then three generations without improvement


def test_search_bounds_are_checked():
    with pytest.raises(ConfigError):
        genetic_search(torch.zeros(8, 4), lambda ids: ids, torch.arange(3), length=0, generations=1,
                       population=4, seed=0)


def test_bpe_tokens_decode_to_text(clip_tokenizer):
    inv = {i: t for t, i in clip_tokenizer.encoder.items()}
    ids = clip_tokenizer.ids("a painting by Van Gogh, 1889!")
    assert decode_bpe_tokens([inv[i] for i in ids]) == "a painting by van gogh , 1 8 8 9 !"  # CLIP splits digits
