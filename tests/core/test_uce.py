"""UCE on tiny seeded models and a tiny causal text encoder."""

from __future__ import annotations

import pytest
import torch
from fakes import edited_weight

from erasure_core import ArchitectureError, ConceptSet, TokenPick, erase, make_config
from erasure_core.text.encoded import erase_rows, preserve_rows


def _config(**kw):
    return make_config("uce", preserve_bank=False, **({"lamb": 1e-5, "preserve_empty_prompt": False} | kw))


@pytest.mark.parametrize(("concepts", "pick"), [
    (ConceptSet.simple(("van gogh",), ("a painter",)), TokenPick.LAST_WORD_EOT_PADDING),
    (ConceptSet.simple(("van gogh", "monet", "cat"), ("a painter", "", "dog")), TokenPick.LAST_SUBJECT),
    (ConceptSet.simple(("van gogh", "cat"), ("a painter", "dog")), TokenPick.FIRST_EOT),
])
def test_targets_map_to_their_anchors_original_outputs(sites, encoder, concepts, pick):
    patch = erase("uce", sites, concepts, encoder, _config(token_pick=pick))
    enc = encoder([p for pair in concepts.erase_pairs() for p in pair])
    ce, ca = erase_rows(enc, concepts.erase_pairs(), pick)
    for site in sites:
        w0 = site.weight.double()
        gap = (w0 @ (ca - ce).double().T).abs().max()
        err = (edited_weight(site, patch) @ ce.double().T - w0 @ ca.double().T).abs().max()
        assert err < 1e-4 * gap


def test_preserved_outputs_move_less_as_preserve_scale_grows(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",), ("monet", "a red car"))
    names = concepts.preserve_prompts()
    keep = encoder(names)
    cp = preserve_rows(keep, names, TokenPick.LAST_WORD_EOT_PADDING).double()
    drift = []
    for scale in (0.0, 0.1, 1.0, 10.0):
        patch = erase("uce", sites, concepts, encoder, _config(lamb=0.5, preserve_scale=scale))
        drift.append(sum((patch[s.key].dense().double() @ cp.T).norm().item() for s in sites))
    assert drift == sorted(drift, reverse=True) and drift[-1] < 0.05 * drift[0]


def test_empty_prompt_is_preserved_by_default(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",))
    empty = encoder([""]).hidden[0].double()
    moved = {}
    for flag in (False, True):
        patch = erase("uce", sites, concepts, encoder, make_config("uce", preserve_bank=False, preserve_empty_prompt=flag,
                                                                   preserve_scale=1.0, lamb=0.5))
        moved[flag] = sum((patch[s.key].dense().double() @ empty.T).norm().item() for s in sites)
    assert moved[True] < 0.2 * moved[False]


def test_one_solve_is_shared_by_every_site(sites, encoder):
    patch = erase("uce", sites, ConceptSet.simple(("van gogh",), ("a painter",)), encoder, _config())
    downs = {id(patch[s.key].down) for s in sites}
    assert len(downs) == 1 and patch.meta["sites"] == len(sites) and patch.meta["rank"] == patch.max_rank


def test_paper_alignment_pairs_last_word_eot_and_padding(encoder):
    enc = encoder(["van gogh", "dog"])  # eot 3 and 2: the anchor block starts one row earlier
    ce, ca = erase_rows(enc, [("van gogh", "dog")], TokenPick.LAST_WORD_EOT_PADDING)
    assert ce.shape[0] == ca.shape[0] == 8 - 2
    torch.testing.assert_close(ce, enc.hidden[0, 2:8])
    torch.testing.assert_close(ca, enc.hidden[1, 1:7])


def test_a_text_encoder_of_the_wrong_width_is_refused(sites):
    from fakes import tiny_encoder

    with pytest.raises(ArchitectureError, match=r"\(\[32\]\), but it produces 16") as err:
        erase("uce", sites, ConceptSet.simple(("cat",), ("dog",)), tiny_encoder(width=16), _config())
    assert err.value.input_name == "clip"


def test_progress_reports_every_site(sites, encoder):
    seen = []
    erase("uce", sites, ConceptSet.simple(("cat",), ("dog",)), encoder, _config(), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(sites), len(sites)) and len(seen) == len(sites)


def test_an_edit_of_full_rank_is_stored_dense_and_equals_the_per_layer_formula(sites, encoder):
    words = tuple(f"w{i}" for i in range(40))  # 40 targets x all rows: far more rows than the width
    concepts = ConceptSet.simple(words, ("a painter",))
    cfg = _config(lamb=0.5)
    patch = erase("uce", sites, concepts, encoder, cfg)
    assert all(not patch[s.key].is_low_rank for s in sites)  # no SVD, no factors: the delta itself
    enc = encoder([p for pair in concepts.erase_pairs() for p in pair])
    ce, ca = (r.double() for r in erase_rows(enc, concepts.erase_pairs(), cfg.token_pick))
    assert len(ce) > sites[0].in_features
    for site in sites:  # UCE eq. 7 per layer: ΔW = s W₀ (C_a − C_e)ᵀ C_e (λI + s C_eᵀC_e)⁻¹
        w0 = site.weight.double()
        a = cfg.lamb * torch.eye(w0.shape[1], dtype=torch.float64) + cfg.erase_scale * ce.T @ ce
        want = cfg.erase_scale * (w0 @ (ca - ce).T @ ce) @ torch.linalg.inv(a)
        torch.testing.assert_close(patch[site.key].dense().double(), want, rtol=1e-5, atol=1e-6)


def test_a_full_rank_edit_defers_its_product_past_the_check_and_keeps_the_weight_it_was_solved_on(sites, encoder):
    # the product W₀ (M − I) is taken only when read (saving, applying as weights); the check works
    # from the shared multiplier, and the weight is snapshotted, so a later change to it is not seen
    from erasure_core.methods.check import check_edit

    concepts = ConceptSet.simple(tuple(f"w{i}" for i in range(40)), ("a painter",))
    originals = {s.key: s.weight.clone() for s in sites}
    patch = erase("uce", sites, concepts, encoder, _config(lamb=0.5))
    assert all(patch[s.key].is_deferred for s in sites)
    check_edit(sites, patch, concepts, encoder, ["a red car"], probes=["a house"])
    assert all(patch[s.key].is_deferred for s in sites)
    right = patch.context_multipliers[sites[0].in_features][0]
    for site in sites:
        site.weight.add_(1.0)  # in place, after the solve
    for site in sites:
        torch.testing.assert_close(patch[site.key].dense(), originals[site.key] @ right)


def test_the_default_ridge_departs_from_the_papers_and_every_paper_preset_restores_it():
    """λ 5 by default (issue #13: unlisted prompts move less); each method's paper presets keep 0.5, bank off."""
    from erasure_core import methods

    for method in ("uce", "rece", "mace", "realera"):
        assert make_config(method).lamb == 5.0
        for preset in methods.get(method).presets:
            config = make_config(method, preset=preset)
            assert config.lamb == 0.5 and not config.preserve_bank, (method, preset)
