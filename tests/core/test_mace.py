"""MACE's closed-form refinement: alignment of the words around the concept."""

from __future__ import annotations

import pytest
from fakes import edited_weight, tiny_encoder

from erasure_core import ConceptError, ConceptSet, erase, make_config
from erasure_core.methods.mace import aligned_rows


@pytest.fixture
def encoder():
    return tiny_encoder(width=32, context_length=12)


def test_alignment_keeps_prefix_suffix_and_padding_but_not_the_concept_words(encoder):
    enc = encoder(["painting by van gogh today", "painting by a painter today"])
    old, new = aligned_rows(enc, "painting by van gogh today", "painting by a painter today")
    assert old == [0, 1, 2, 5, 6, *range(7, 12)] and new == old  # words 3, 4 left out


def test_padding_is_aligned_from_the_end_when_lengths_differ(encoder):
    enc = encoder(["by van gogh", "by dog"])
    old, new = aligned_rows(enc, "by van gogh", "by dog")
    assert old[:2] == [0, 1] and new[:2] == [0, 1]  # start token and 'by'
    assert (old[2], new[2]) == (4, 3)  # the end-of-text rows
    assert old[3:] == new[3:] == list(range(12 - 7, 12))  # the 7 padding rows both prompts have


def test_prefix_rows_keep_their_outputs(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",), templates=("painting by {}",))
    patch = erase("mace", sites, concepts, encoder, make_config("mace", lamb=1e-6, preserve_empty_prompt=False))
    enc = encoder(["painting by van gogh"])
    prefix = enc.hidden[0, :3].double()  # start, 'painting', 'by': identical in target and anchor
    for site in sites:
        moved = (edited_weight(site, patch) - site.weight.double()) @ prefix.T
        assert moved.abs().max() < 1e-6 * site.weight.abs().max()


def test_suffix_rows_map_to_the_anchors(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",), templates=("{} painting",))
    patch = erase("mace", sites, concepts, encoder, make_config("mace", lamb=1e-5, preserve_empty_prompt=False))
    enc = encoder(["van gogh painting", "a painter painting"])
    o, n = aligned_rows(enc, "van gogh painting", "a painter painting")
    old, new = enc.hidden[0, o].double(), enc.hidden[1, n].double()
    for site in sites:
        err = edited_weight(site, patch) @ old.T - site.weight.double() @ new.T
        assert err.abs().max() < 1e-3 * (site.weight.double() @ (new - old).T).abs().max()


def test_without_templates_mace_uses_the_built_in_ones(sites, encoder):
    patch = erase("mace", sites, ConceptSet.simple(("van gogh",), ("a painter",)), encoder, make_config("mace"))
    assert "a painting of {}" in patch.meta["concepts"]["templates"]["generic"]


def test_an_encoder_without_token_ids_is_refused(sites, encoder):
    import dataclasses

    def no_ids(texts):
        return dataclasses.replace(encoder(texts), token_ids=None)

    with pytest.raises(ConceptError, match="token ids") as err:
        erase("mace", sites, ConceptSet.simple(("van gogh",), ("a painter",)), no_ids, make_config("mace"))
    assert err.value.input_name == "clip"
