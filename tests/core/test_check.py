"""The check (issue #12 item 3, issue #13): gap left, drift, held-out probes, against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import edited_weight

from erasure_core import ConceptSet, PatchEntry, PatchSet, erase, make_config
from erasure_core.concepts import Concept, ConceptKind
from erasure_core.methods.bank import bank_prompts, probe_prompts
from erasure_core.methods.check import check_edit
from erasure_core.methods.closed_form import preserve_list

CONCEPTS = ConceptSet.simple(("cat",), ("dog",))


def _random_patch(sites, low_rank: bool | str) -> PatchSet:
    gen = torch.Generator().manual_seed(3)
    entries = {}
    shared = torch.randn(2, sites[0].weight.shape[1], generator=gen) * 0.1
    for site in sites[:2]:  # the last site is left unedited: it adds to the gap only
        d_out, d_in = site.weight.shape
        if low_rank:  # "shared": one down factor for both sites, as the UCE family's solves give
            down = shared if low_rank == "shared" else torch.randn(2, d_in, generator=gen) * 0.1
            entries[site.key] = PatchEntry(up=torch.randn(d_out, 2, generator=gen) * 0.1, down=down)
        else:
            entries[site.key] = PatchEntry(diff=torch.randn(d_out, d_in, generator=gen) * 0.01)
    return PatchSet(entries, {})


def _edited(sites, patch, strength):
    return [edited_weight(s, patch, strength) if s.key in patch.entries else s.weight.double() for s in sites]


def _gap(sites, encoder, target, anchor):
    """``‖(X_e − X_a) Wᵀ‖`` over every site, straight from the weights."""
    enc = encoder([target, anchor])
    d = (enc.hidden[0] - enc.hidden[1]).double()
    return math.sqrt(sum((d @ s.weight.double().T).pow(2).sum().item() for s in sites))


def _moved(sites, patch, encoder, prompt, strength):
    """``‖X (W' − W)ᵀ‖`` over every site."""
    x = encoder([prompt]).hidden[0].double()
    return math.sqrt(sum((x @ (w1 - s.weight.double()).T).pow(2).sum().item()
                         for s, w1 in zip(sites, _edited(sites, patch, strength), strict=True)))


def _brute(sites, patch, encoder, target, anchor, prompt, strength):
    enc = encoder([target, anchor])
    x_e, x_a = (enc.hidden[i].double() for i in range(2))
    w1 = _edited(sites, patch, strength)
    gap = _gap(sites, encoder, target, anchor)
    left = math.sqrt(sum((x_e @ b.T - x_a @ s.weight.double().T).pow(2).sum().item()
                         for s, b in zip(sites, w1, strict=True)))
    return left / gap, _moved(sites, patch, encoder, prompt, strength) / gap


@pytest.mark.parametrize("low_rank", [True, "shared", False])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_gap_left_and_drift_equal_the_per_site_sums(sites, encoder, low_rank, strength):
    patch = _random_patch(sites, low_rank)
    check = check_edit(sites, patch, CONCEPTS, encoder, ["a red car"], strength=strength, probes=["a house"])
    left, drift = _brute(sites, patch, encoder, "cat", "dog", "a red car", strength)
    _, probe = _brute(sites, patch, encoder, "cat", "dog", "a house", strength)
    assert check.targets[0][0] == "cat" and check.targets[0][1] == pytest.approx(left, rel=1e-5)
    assert check.preserved == (("a red car", pytest.approx(drift, rel=1e-5)),)
    assert check.probes == (("a house", pytest.approx(probe, rel=1e-5)),)


def test_no_edit_leaves_the_whole_gap_and_moves_nothing(sites, encoder):
    check = check_edit(sites, PatchSet({}, {}), CONCEPTS, encoder, [""], probes=["a house"])
    assert check.worst_target == pytest.approx(1.0) and check.worst_preserved == 0 and check.worst_probe == 0


def test_an_exact_uce_edit_leaves_no_gap_and_strength_zero_leaves_all_of_it(sites, encoder):
    config = make_config("uce", lamb=1e-6, preserve_empty_prompt=False, preserve_bank=False, token_pick="all tokens")
    patch = erase("uce", sites, CONCEPTS, encoder, config)
    assert check_edit(sites, patch, CONCEPTS, encoder, []).worst_target < 1e-3
    assert check_edit(sites, patch, CONCEPTS, encoder, [], strength=0.0).worst_target == pytest.approx(1.0)


def test_the_bank_lowers_the_drift_of_held_out_probes(sites, encoder):
    probes = ["a snowy mountain village", "a bowl of soup", "a sailing ship"]
    worst = {}
    for bank in (False, True):
        config = make_config("uce", preserve_bank=bank)
        patch = erase("uce", sites, CONCEPTS, encoder, config)
        keep = preserve_list(CONCEPTS, preserve_empty=True, bank=bank)
        worst[bank] = check_edit(sites, patch, CONCEPTS, encoder, keep, probes=probes).worst_probe
    assert worst[True] < worst[False]


def test_bank_and_probes_are_disjoint_and_name_no_target():
    concepts = ConceptSet((Concept("horse", "a dog", kind=ConceptKind.OBJECT),), (Concept("a cup of coffee"),))
    keep = preserve_list(concepts, preserve_empty=True, bank=True)
    probes = probe_prompts(concepts, keep)
    bank = bank_prompts(concepts)
    assert bank and probes and not set(bank) & set(probes)
    assert not any("horse" in p for p in bank + probes)  # "a photo of a horse" is a neighbour: dropped
    assert keep.count("a cup of coffee") == 1 and "a cup of coffee" not in probes
    assert "a painting by Claude Monet" not in bank  # artists are not neighbours of an object


def test_the_report_lines_name_each_group(sites, encoder):
    check = check_edit(sites, _random_patch(sites, True), CONCEPTS, encoder, ["a red car"], probes=["a house"])
    text = "\n".join(check.lines())
    assert "gap left on targets (1)" in text and "drift of preserved (1)" in text and "probe 'a house'" in text


def test_many_targets_use_the_full_gram_and_give_the_same_numbers(sites, encoder):
    # 5 targets x 8 rows exceed the width (32): G_WW is taken whole instead of against the rows
    names = ("cat", "horse", "bird", "fish", "cow")
    concepts = ConceptSet.simple(names, ("dog",))
    patch = _random_patch(sites, True)
    check = check_edit(sites, patch, concepts, encoder, [], probes=[])
    for name, value in check.targets:
        assert value == pytest.approx(_brute(sites, patch, encoder, name, "dog", "", 1.0)[0], rel=1e-5)


@pytest.mark.parametrize("names", [("cat",), ("cat", "horse", "bird", "fish", "cow")])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_a_shared_multiplier_patch_gives_the_per_site_sums(sites, encoder, names, strength):
    # UCE's patch carries its per-width multiplier (ΔW_l = W_l P Q): the check then works from one
    # Gram of the weights; one target keeps the edit low-rank, five exceed the width (dense, D = I)
    concepts = ConceptSet.simple(names, ("dog",))
    config = make_config("uce", preserve_bank=False, token_pick="all tokens")
    patch = erase("uce", sites, concepts, encoder, config)
    assert patch.context_multipliers, "the fast path needs the patch's multipliers"
    check = check_edit(sites, patch, concepts, encoder, ["a red car"], strength=strength, probes=["a house"])
    for name, value in check.targets:
        assert value == pytest.approx(_brute(sites, patch, encoder, name, "dog", "", strength)[0], rel=1e-4)
    gaps = [_gap(sites, encoder, n, "dog") for n in names]
    unit = math.sqrt(sum(g * g for g in gaps) / len(gaps))
    for prompt, value in (*check.preserved, *check.probes):
        assert value == pytest.approx(_moved(sites, patch, encoder, prompt, strength) / unit, rel=1e-4)
