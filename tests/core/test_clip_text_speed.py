"""ClipTextEncoder(rows="through_eot"): only the positions up to the last EOT, equal to the full
encoding's first rows (the model is causal), with prompts batched by length and returned in order."""

from __future__ import annotations

import pytest
import torch
from fakes import tiny_encoder, tiny_sites

from erasure_core import ConceptSet, ConfigError, TokenPick, erase, make_config
from erasure_core.text import clip as clip_module
from erasure_core.text import prefix_tree
from erasure_core.text.clip import ClipTextConfig, ClipTextEncoder
from erasure_core.text.encoded import erase_rows, preserve_rows
from erasure_core.text.prefix_tree import PrefixTree, tree_attention

# 1 to 6 words: with the word tokenizer (context 8) the EOT lands at positions 2..7.
MIXED = ["a b c d e f", "cat", "", "a photo of a cat", "dog", "van gogh", "x y z w v", "tree"]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _close_through_eot(short, full) -> None:
    """Every row up to each prompt's first EOT matches the full encoding (later rows may be 0)."""
    for i, eot in enumerate(short.eot_index.tolist()):
        _close(short.hidden[i, : eot + 1], full.hidden[i, : eot + 1])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_through_eot_rows_equal_the_first_rows_of_the_full_encoding(batch_size):
    enc = tiny_encoder()
    enc.batch_size = batch_size
    full = enc(MIXED)
    short = enc(MIXED, rows="through_eot")
    t = int(full.eot_index.max()) + 1
    assert full.hidden.shape == (len(MIXED), 8, 32)
    assert short.hidden.shape == (len(MIXED), t, 32)
    assert short.texts == full.texts == tuple(MIXED)
    assert torch.equal(short.eot_index, full.eot_index)
    _close_through_eot(short, full)


def test_short_batches_stop_at_their_own_longest_prompt():
    enc = tiny_encoder()
    full = enc(["cat", "a dog"])
    short = enc(["cat", "a dog"], rows="through_eot")
    assert short.hidden.shape[1] == 4  # start, a, dog, EOT
    _close_through_eot(short, full)


@pytest.mark.parametrize("rows", ["all", "through_eot"])
def test_mixed_lengths_come_back_in_the_order_given(rows):
    enc = tiny_encoder()
    enc.batch_size = 3  # several chunks, each mixing prompts from all over the input
    batch = enc(MIXED, rows=rows)
    for i, text in enumerate(MIXED):
        alone = enc([text])  # rows="all" on its own: no batching, no reordering
        t = batch.hidden.shape[1] if rows == "all" else int(alone.eot_index[0]) + 1
        _close(batch.hidden[i, :t], alone.hidden[0, :t])
        assert int(batch.eot_index[i]) == int(alone.eot_index[0])


def test_passes_group_prompts_of_similar_length_and_batches_stop_at_their_eot(monkeypatch):
    monkeypatch.setattr(clip_module, "TREE_MAX_LENGTH", 0)  # prompts longer than the tree takes
    enc = tiny_encoder()
    enc.batch_size = 3
    seen: list[list[list[int]]] = []
    forward_groups = enc.forward_groups

    def spy(groups):
        seen.append([[int(row.eq(1).nonzero()[0]) if row.eq(1).any() else -1 for row in g] for g in groups])
        return forward_groups(groups)

    enc.forward_groups = spy  # type: ignore[method-assign]
    enc(MIXED, rows="through_eot")
    ends = [e for p in seen for g in p for e in g]
    assert sorted(ends) == sorted(int(e) for e in enc.tokenizer(MIXED)[1])  # every prompt once
    for p in seen:
        assert sum(len(g) for g in p) <= 3
        for g in p:  # one length per batch, stopping at the EOT: no padding row computed
            assert len(set(g)) == 1
    assert seen
    flat = [min(min(g) for g in p) for p in seen]
    assert flat == sorted(flat)  # passes go from short to long


def test_rows_must_be_a_known_mode():
    with pytest.raises(ConfigError, match="rows"):
        tiny_encoder()(["cat"], rows="some")


@pytest.mark.parametrize("pick", [TokenPick.LAST_SUBJECT, TokenPick.FIRST_EOT])
def test_single_row_token_picks_read_the_same_keys(pick):
    enc = tiny_encoder()
    pairs = [("van gogh", "a painter"), ("cat", ""), ("a b c d e f", "dog")]
    keep = ["monet", "a red car", ""]
    texts = list(dict.fromkeys([p for pair in pairs for p in pair] + keep))
    full, short = enc(texts), enc(texts, rows="through_eot")
    for got, want in zip(erase_rows(short, pairs, pick), erase_rows(full, pairs, pick), strict=True):
        _close(got, want)
    _close(preserve_rows(short, keep, pick), preserve_rows(full, keep, pick))


def test_uce_with_last_subject_gives_the_same_patch_from_through_eot_rows():
    enc, sites = tiny_encoder(), tiny_sites()
    concepts = ConceptSet.simple(("van gogh", "claude monet"), ("a painter",), ("rembrandt", "a photo of a cat"))
    config = make_config("uce", token_pick=TokenPick.LAST_SUBJECT)
    want = erase("uce", sites, concepts, enc, config)
    got = erase("uce", sites, concepts, lambda texts: enc(texts, rows="through_eot"), config)
    for site in sites:
        _close(got[site.key].dense(), want[site.key].dense())


def test_clip_bpe_through_eot_matches_the_full_77_rows(clip_tokenizer):
    enc = ClipTextEncoder(ClipTextConfig(width=64, layers=2, heads=2), clip_tokenizer, seed=5, batch_size=2)
    texts = ["Kalinda Moraveth", "a photo of a cat", "", "Van Gogh", "an oil painting by Salvador Dali"]
    full = enc(texts)
    short = enc(texts, rows="through_eot")
    t = int(full.eot_index.max()) + 1
    assert full.hidden.shape[1] == 77 and short.hidden.shape[1] == t < 77
    _close_through_eot(short, full)
    for i, text in enumerate(texts):
        e = int(short.eot_index[i])
        _close(short.hidden[i, : e + 1], enc([text]).hidden[0, : e + 1])


def _reference_forward(enc: ClipTextEncoder, ids: torch.Tensor) -> torch.Tensor:
    """The textbook causal CLIP pass, written with nn.MultiheadAttention over every position."""
    t = ids.shape[1]
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = enc.token_embedding(ids) + enc.position_embedding[:t]
    for block in enc.blocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = block.fc1(block.ln_2(x))
        x = x + block.fc2(h * torch.sigmoid(1.702 * h))
    return enc.final_ln(x)


@pytest.mark.parametrize("same_start", [True, False])
def test_forward_matches_the_textbook_pass_with_and_without_a_shared_start_token(same_start):
    torch.manual_seed(0)
    enc = ClipTextEncoder(ClipTextConfig(width=64, layers=3, heads=4, vocab_size=100, context_length=12))
    ids = torch.randint(0, 99, (5, 9))
    ids[:, 0] = 99
    if not same_start:
        ids[2, 0] = 7  # one row starts differently: the start position cannot be shared
    with torch.no_grad():
        _close(enc.forward(ids), _reference_forward(enc, ids))
        _close(enc.forward(ids[:, :1]), _reference_forward(enc, ids[:, :1]))  # start token alone


@pytest.mark.parametrize("rows", ["all", "through_eot"])
def test_an_empty_batch_encodes_to_an_empty_result(rows):
    enc = tiny_encoder()
    out = enc([], rows=rows)
    assert out.texts == () and out.hidden.shape[0] == 0 and out.hidden.shape[2] == 32
    assert out.eot_index.shape == (0,)


def test_prefix_tree_holds_each_distinct_prefix_once():
    tree = PrefixTree.build([[0, 5, 6, 1], [0, 5, 7, 1], [0, 1], [0, 5, 6, 1]])
    assert len(tree) == 7  # 0 | 0 5 | 0 5 6 | 0 5 6 1 | 0 5 7 | 0 5 7 1 | 0 1
    assert tree.rows[0].tolist() == tree.rows[3].tolist()  # the same prompt: the same nodes
    assert tree.rows[2].tolist()[2:] == [-1, -1]
    for n, seq in enumerate([[0, 5, 6, 1], [0, 5, 7, 1], [0, 1], [0, 5, 6, 1]]):
        nodes = tree.rows[n, : len(seq)]
        assert tree.tokens[nodes].tolist() == seq
        assert tree.positions[nodes].tolist() == list(range(len(seq)))
        last = int(nodes[-1])  # a node's path is its prompt's nodes up to it
        assert tree.paths[last][tree.mask[last]].tolist() == nodes.tolist()


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "gathered"])
def test_tree_attention_equals_causal_attention_over_each_prompt(monkeypatch, dense):
    """Both forms (every node against every node under the ancestor mask; each node's gathered
    path) give each prompt's causal attention at its rows."""
    monkeypatch.setattr(prefix_tree, "DENSE_SCORES", 1 << 30 if dense else 0)
    seqs = [[0, 5, 6, 1], [0, 5, 7, 1, 9], [0, 1], [0, 5, 6, 1], [0, 8]]
    tree = PrefixTree.build(seqs)
    heads, d = 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(tree), d, generator=gen) for _ in range(3))
    out = tree_attention(q, k, v, tree, heads)
    for n, seq in enumerate(seqs):
        nodes = tree.rows[n, : len(seq)]
        qh, kh, vh = (z[nodes].reshape(len(seq), heads, d // heads).transpose(0, 1) for z in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        _close(out[nodes], want.transpose(0, 1).reshape(len(seq), d))


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "gathered"])
@pytest.mark.parametrize("batch_size", [2, 64])
def test_the_prefix_tree_pass_equals_the_per_length_batches_and_the_full_encoding(monkeypatch, batch_size, dense):
    monkeypatch.setattr(prefix_tree, "DENSE_SCORES", 1 << 30 if dense else 0)
    enc = tiny_encoder()
    enc.batch_size = batch_size
    texts = [*MIXED, "a photo of a dog", "a photo of", "a b c", "cat"]
    seen = []
    forward_tree = enc.forward_tree

    def spy(tree):
        seen.append(len(tree))
        return forward_tree(tree)

    enc.forward_tree = spy  # type: ignore[method-assign]
    tree = enc(texts, rows="through_eot")
    ids, eot = enc.tokenizer(texts)
    distinct = {tuple(ids[i, : k + 1].tolist()) for i in range(len(texts)) for k in range(int(eot[i]) + 1)}
    if batch_size == 64:  # one pass: every distinct prefix computed once
        assert seen == [len(distinct)]
    monkeypatch.setattr(clip_module, "TREE_MAX_LENGTH", 0)
    groups = enc(texts, rows="through_eot")
    _close(tree.hidden, groups.hidden)
    _close_through_eot(tree, enc(texts))
    assert torch.equal(tree.token_ids, groups.token_ids)


@pytest.mark.parametrize("batch_size", [2, 64])
def test_through_last_word_rows_equal_the_full_encoding_up_to_each_last_word(batch_size):
    enc = tiny_encoder()
    enc.batch_size = batch_size
    lead, full = enc(MIXED, rows="through_last_word"), enc(MIXED)
    assert lead.hidden.shape[1] == int(full.eot_index.max()) + 1
    for i, eot in enumerate(full.eot_index.tolist()):
        stop = max(eot, 1)  # the empty prompt's "last word" is its start token
        _close(lead.hidden[i, :stop], full.hidden[i, :stop])
        assert not lead.hidden[i, stop:].any()  # the EOT row is not computed
    for pick in (TokenPick.LAST_SUBJECT,):
        _close(preserve_rows(lead, MIXED, pick), preserve_rows(full, MIXED, pick))
