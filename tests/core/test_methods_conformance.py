"""Every registered method gets the same checks (peft testing_common style)."""

from __future__ import annotations

import pytest
import torch
from fakes import tiny_encoder, tiny_sites

from erasure_core import ConceptError, ConceptSet, ConfigError, PatchSet, erase, make_config, methods

CONCEPTS = ConceptSet.simple(("van gogh", "monet"), ("a painter", "an artist"), ("a red car",))


@pytest.fixture(params=methods.names())
def method(request):
    return request.param


def test_returns_finite_patchset_over_a_subset_of_sites(method, sites, encoder):
    patch = erase(method, sites, CONCEPTS, encoder, make_config(method))
    assert isinstance(patch, PatchSet) and set(patch.keys()) <= {s.key for s in sites}
    for s in sites:
        if s.key in patch:
            d = patch[s.key].dense()
            assert d.shape == s.weight.shape and torch.isfinite(d).all()


def test_strength_zero_is_the_identity(method, sites, encoder):
    patch = erase(method, sites, CONCEPTS, encoder, make_config(method)).scaled(0.0)
    assert all(torch.count_nonzero(patch[k].dense()) == 0 for k in patch)


def test_no_targets_raise_concept_error(method):
    with pytest.raises(ConceptError):
        ConceptSet.simple((), ("a painter",))


def test_deterministic_for_the_same_inputs(method):
    a = erase(method, tiny_sites(), CONCEPTS, tiny_encoder(), make_config(method))
    b = erase(method, tiny_sites(), CONCEPTS, tiny_encoder(), make_config(method))
    assert all(torch.equal(a[k].dense(), b[k].dense()) for k in a)


def test_concept_order_does_not_matter(method, sites, encoder):
    swapped = ConceptSet.simple(("monet", "van gogh"), ("an artist", "a painter"), ("a red car",))
    a = erase(method, sites, CONCEPTS, encoder, make_config(method))
    b = erase(method, sites, swapped, encoder, make_config(method))
    for k in a:
        torch.testing.assert_close(a[k].dense(), b[k].dense(), rtol=1e-5, atol=1e-6)


def test_out_of_range_options_raise_config_error_naming_the_option(method):
    with pytest.raises(ConfigError, match="'lamb' must be between") as err:
        make_config(method, lamb=-1.0)
    assert err.value.input_name == "lamb"
    with pytest.raises(ConfigError, match="token_pick"):
        make_config(method, token_pick="every other token")


def test_uce_text_length_stops_at_t5s_training_length():
    """Every prompt's padded rows stay in memory during the erase: past 512 a few hundred preserve
    prompts took tens of GB."""
    assert make_config("uce", text_length=512).text_length == 512
    with pytest.raises(ConfigError, match="'text_length' must be between 0 and 512") as err:
        make_config("uce", text_length=513)
    assert err.value.input_name == "text_length"
