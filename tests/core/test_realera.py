"""UCE with RealEra's neighbour mining."""

from __future__ import annotations

import pytest
import torch
from fakes import edited_weight

from erasure_core import ConceptSet, ConfigError, erase, make_config
from erasure_core.methods.realera import sample_neighbours


def test_neighbours_lie_in_the_cosine_band_and_within_the_distance():
    rows = torch.randn(5, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = make_config("realera", min_cosine=0.9, max_cosine=0.97, max_distance=0.4)
    near, source = sample_neighbours(rows, 20, config, torch.Generator().manual_seed(1))
    base = rows[source]
    cos = torch.nn.functional.cosine_similarity(near, base)
    assert cos.min() >= 0.92 - 1e-9 and cos.max() <= 0.97 + 1e-9  # 0.92: where the distance cap binds
    assert ((near - base).norm(dim=1) / base.norm(dim=1)).max() <= 0.4 + 1e-9


def test_held_out_neighbours_move_closer_to_the_anchor_than_with_plain_uce(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",), ("a red car",))
    pick = "last subject token"
    uce = erase("uce", sites, concepts, encoder, make_config("uce", token_pick=pick))
    real = erase("realera", sites, concepts, encoder, make_config("realera", token_pick=pick, neighbours=16))
    enc = encoder(["van gogh", "a painter"])
    target, anchor = enc.hidden[0, 2:3].double(), enc.hidden[1, 2:3].double()
    held_out, _ = sample_neighbours(target, 32, make_config("realera"), torch.Generator().manual_seed(99))

    def residual(patch):
        return sum((edited_weight(s, patch) @ held_out.T - s.weight.double() @ anchor.T).norm().item() for s in sites)

    assert residual(real) < residual(uce)


def test_an_empty_cosine_band_is_refused():
    with pytest.raises(ConfigError, match="min_cosine must not exceed max_cosine"):
        make_config("realera", min_cosine=0.99, max_cosine=0.9)
    with pytest.raises(ConfigError) as err:
        make_config("realera", min_cosine=0.4, max_cosine=0.5, max_distance=0.1)
    assert err.value.input_name == "max_distance"


def test_zero_neighbours_is_uce(sites, encoder):
    concepts = ConceptSet.simple(("van gogh",), ("a painter",))
    a = erase("uce", sites, concepts, encoder, make_config("uce"))
    b = erase("realera", sites, concepts, encoder, make_config("realera", neighbours=0))
    for key in a:
        torch.testing.assert_close(a[key].dense(), b[key].dense(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("neighbours", [1, 16])  # rows below the width (one solve), above (Grams streamed)
def test_the_edit_equals_uce_eq7_over_targets_plus_neighbours(sites, encoder, neighbours):
    from erasure_core.methods.closed_form import encode_concepts
    from erasure_core.methods.realera import neighbour_rows

    concepts = ConceptSet.simple(("van gogh", "monet"), ("a painter",), ("a red car",))
    config = make_config("realera", token_pick="last subject token", neighbours=neighbours, lamb=0.5)
    patch = erase("realera", sites, concepts, encoder, config)
    keys = encode_concepts(concepts, encoder, sites, preserve_empty=config.preserve_empty_prompt,
                           bank=config.preserve_bank)
    ce, ca = keys.erase(config.token_pick)
    cp = keys.preserve(config.token_pick).double()
    extra = list(neighbour_rows(keys, config))
    ce = torch.cat([ce, *(n for n, _ in extra)]).double()
    ca = torch.cat([ca, *(a for _, a in extra)]).double()
    assert (len(ce) > sites[0].in_features) == (neighbours == 16)
    s, sp, lam = config.erase_scale, config.preserve_scale, config.lamb
    for site in sites:  # W = W₀ + s W₀(C_a − C_e)ᵀ C_e (λI + s C_eᵀC_e + s_p C_pᵀC_p)⁻¹
        w0 = site.weight.double()
        a = lam * torch.eye(w0.shape[1], dtype=torch.float64) + s * ce.T @ ce + sp * cp.T @ cp
        want = s * w0 @ (ca - ce).T @ ce @ torch.linalg.inv(a)
        # the neighbours' own Gram is taken in float32 (random draws): agreement to ~1e-5 of the edit
        scale = want.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(patch[site.key].dense().double(), want, rtol=0, atol=2e-5 * scale)
