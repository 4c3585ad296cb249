"""closed_form attack (RECE's adversarial embedding) and the K/V recovery score, on the tiny
seeded sites and encoder, against float64 references written from the equations."""

from __future__ import annotations

import pytest
import torch

from erasure_core import ArchitectureError, AttentionSite, ConceptSet, erase, make_config
from erasure_core.attacks import closed_form_attack, kv_distance, kv_grams
from erasure_core.attacks.recovery import kv_recovery

CONCEPT = "van gogh"


def _erased(sites, encoder, method="uce", **options):
    concepts = ConceptSet.simple((CONCEPT,), ("a painter",), ("monet",))
    patch = erase(method, sites, concepts, encoder, make_config(method, **options))
    return [AttentionSite(s.key, s.weight + patch[s.key].dense()) for s in sites]


def _kv(sites, rows):
    """Stacked K/V outputs ``[Σ d_out, T]`` of every site for ``rows [T, d]`` (float64)."""
    return torch.cat([s.weight.double() @ rows.double().T for s in sites])


def test_attack_rows_reproduce_the_originals_kv_of_the_concept_through_uce_weights(sites, encoder):
    erased = _erased(sites, encoder)
    concept = encoder([CONCEPT]).hidden[0]
    grams = kv_grams(erased, sites)
    attack = closed_form_attack(concept, grams, reg=1e-6)
    want, got = _kv(sites, concept), _kv(erased, attack)
    before = _kv(erased, concept)
    assert (got - want).norm() < 1e-3 * want.norm()
    assert (before - want).norm() > 0.05 * want.norm()  # the erasure did move the concept's K/V
    score = kv_recovery(grams, attack, concept)
    assert score.score == pytest.approx(1.0, abs=1e-4) and not score.identical


def test_attack_equals_the_per_site_float64_ridge_solution(sites, encoder):
    erased = _erased(sites, encoder)
    concept = encoder([CONCEPT]).hidden[0].double()
    grams = kv_grams(erased, sites)
    reg = 1e-2
    lam = reg * float(sum((s.weight.double() ** 2).sum() for s in erased)) / concept.shape[1]
    lhs = sum(s.weight.double().T @ s.weight.double() for s in erased) + lam * torch.eye(concept.shape[1],
                                                                                            dtype=torch.float64)
    rhs = sum(e.weight.double().T @ o.weight.double() for e, o in zip(erased, sites, strict=True))
    want = torch.linalg.solve(lhs, rhs @ concept.T).T
    torch.testing.assert_close(closed_form_attack(concept, grams, reg).double(), want, rtol=1e-5, atol=1e-6)


def test_rece_hardened_erasure_resists_the_same_attack_better(sites, encoder):
    concept = encoder([CONCEPT]).hidden[0]
    scores = {}
    for method, options in (("uce", {}), ("rece", {"epochs": 2, "reg": 1e-2})):
        grams = kv_grams(_erased(sites, encoder, method, **options), sites)
        scores[method] = kv_recovery(grams, closed_form_attack(concept, grams, reg=1e-4), concept).score
    assert scores["uce"] > 0.999
    assert scores["rece"] < scores["uce"] - 0.01


def test_kv_distance_matches_the_stacked_outputs(sites, encoder):
    erased = _erased(sites, encoder)
    grams = kv_grams(erased, sites)
    a, c = encoder(["a red car"]).hidden[0], encoder([CONCEPT]).hidden[0]
    want = float(((_kv(erased, a) - _kv(sites, c)) ** 2).sum())
    assert kv_distance(grams, a, c) == pytest.approx(want, rel=1e-9)
    assert kv_distance(grams, None, c) == pytest.approx(float((_kv(sites, c) ** 2).sum()), rel=1e-9)
    score = kv_recovery(grams, a, c)
    gap = float(((_kv(erased, c) - _kv(sites, c)) ** 2).sum())
    assert score.score == pytest.approx(1 - want / gap, rel=1e-7)


def test_identical_models_are_reported_with_a_trivial_score(sites, encoder):
    grams = kv_grams(sites, sites)
    concept = encoder([CONCEPT]).hidden[0]
    score = kv_recovery(grams, closed_form_attack(concept, grams, 1e-3), concept)
    assert grams.identical_weights and score.identical and score.score == 1.0
    assert "trivially 1" in score.describe()


def test_models_of_different_architectures_are_refused(sites):
    from fakes import tiny_sites

    with pytest.raises(ArchitectureError, match="same architecture"):
        kv_grams(sites, sites[:4])
    with pytest.raises(ArchitectureError, match="same weight shapes"):
        kv_grams(sites, tiny_sites(d_outs=(16, 24, 8)))


def test_negative_reg_is_refused(sites, encoder):
    from erasure_core import ConfigError

    grams = kv_grams(sites, sites)
    with pytest.raises(ConfigError, match="reg"):
        closed_form_attack(encoder([CONCEPT]).hidden[0], grams, -1.0)
