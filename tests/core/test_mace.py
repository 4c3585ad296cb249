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
    patch = erase("mace", sites, concepts, encoder, make_config("mace", preserve_bank=False, lamb=1e-6, preserve_empty_prompt=False))
    enc = encoder(["painting by van gogh"])
    prefix = enc.hidden[0, :3].double()  # start, 'painting', 'by': identical in target and anchor
    for site in sites:
        moved = (edited_weight(site, patch) - site.weight.double()) @ prefix.T
        assert moved.abs().max() < 1e-6 * site.weight.abs().max()


def test_suffix_rows_map_to_the_anchors(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",), templates=("{} painting",))
    patch = erase("mace", sites, concepts, encoder, make_config("mace", preserve_bank=False, lamb=1e-5, preserve_empty_prompt=False))
    enc = encoder(["van gogh painting", "a painter painting"])
    o, n = aligned_rows(enc, "van gogh painting", "a painter painting")
    old, new = enc.hidden[0, o].double(), enc.hidden[1, n].double()
    for site in sites:
        err = edited_weight(site, patch) @ old.T - site.weight.double() @ new.T
        assert err.abs().max() < 1e-3 * (site.weight.double() @ (new - old).T).abs().max()


def test_without_templates_mace_uses_the_built_in_ones(sites, encoder):
    patch = erase("mace", sites, ConceptSet.simple(("van gogh",), ("a painter",)), encoder, make_config("mace", preserve_bank=False))
    assert "a painting of {}" in patch.meta["concepts"]["templates"]["generic"]


def test_an_encoder_without_token_ids_is_refused(sites, encoder):
    import dataclasses

    def no_ids(texts):
        return dataclasses.replace(encoder(texts), token_ids=None)

    with pytest.raises(ConceptError, match="token ids") as err:
        erase("mace", sites, ConceptSet.simple(("van gogh",), ("a painter",)), no_ids, make_config("mace", preserve_bank=False))
    assert err.value.input_name == "clip"


# one concept: fewer aligned rows than the width (low-rank solve); three concepts x three
# templates: more (full rank, Grams accumulated over batches of pairs, 10 rows per batch here)
@pytest.mark.parametrize("targets", [("van gogh",), ("van gogh", "monet", "picasso")])
def test_matches_a_per_layer_float64_solve_of_the_aligned_rows(sites, encoder, targets, monkeypatch):
    """W = (λW₀ + s Σ W₀ c_new c_oldᵀ + s_p Σ W₀ c_p c_pᵀ)(λI + s Σ c_old c_oldᵀ + s_p Σ c_p c_pᵀ)⁻¹ per layer,
    with c_old / c_new the aligned rows of every templated pair and c_p all rows of the preserve prompts."""
    import torch

    monkeypatch.setattr("erasure_core.methods.mace.GRAM_CHUNK", 10)
    templates = ("{}", "art by {}") if len(targets) == 1 else ("{}", "art by {}", "a painting by {}")
    concepts = ConceptSet.simple(targets, ("a painter",), ("a red car",), templates=templates)
    config = make_config("mace", preserve_bank=False, lamb=0.3, erase_scale=1.2, preserve_scale=0.4)
    patch = erase("mace", sites, concepts, encoder, config)
    pairs = concepts.erase_pairs()
    keep = concepts.preserve_prompts([""])
    enc = encoder([p for pair in pairs for p in pair] + keep)
    old_rows, new_rows = [], []
    for old, new in pairs:
        o, n = aligned_rows(enc, old, new)
        old_rows.append(enc.hidden[enc.index(old)][o])
        new_rows.append(enc.hidden[enc.index(new)][n])
    co, cn = torch.cat(old_rows).double(), torch.cat(new_rows).double()
    assert (len(co) > sites[0].in_features) == (len(targets) > 1)
    cp = torch.cat([enc.hidden[enc.index(p)] for p in keep]).double()
    eye = torch.eye(co.shape[1], dtype=torch.float64)
    for site in sites:
        w0 = site.weight.double()
        mat1 = 0.3 * w0 + 1.2 * (w0 @ cn.T) @ co + 0.4 * (w0 @ cp.T) @ cp
        mat2 = 0.3 * eye + 1.2 * co.T @ co + 0.4 * cp.T @ cp
        expected = mat1 @ torch.linalg.inv(mat2)
        torch.testing.assert_close(edited_weight(site, patch), expected, rtol=1e-5, atol=1e-5)
