"""Property tests (hypothesis) of the algebra every method relies on."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erasure_core import PatchEntry, PatchSet
from erasure_core.edit.linalg import anchored_right_multiplier

seeds = st.integers(0, 2**16)


@settings(max_examples=30, deadline=None)
@given(seeds, st.floats(-3, 3), st.floats(-3, 3))
def test_scaling_twice_equals_scaling_by_the_product(seed, a, b):
    g = torch.Generator().manual_seed(seed)
    p = PatchSet({"k": PatchEntry(up=torch.randn(5, 2, generator=g), down=torch.randn(2, 4, generator=g))})
    torch.testing.assert_close(p.scaled(a).scaled(b)["k"].dense(), p.scaled(a * b)["k"].dense(), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 6), st.floats(0.01, 5))
def test_target_equal_to_anchor_gives_no_edit(seed, rows, lamb):
    g = torch.Generator().manual_seed(seed)
    ce = torch.randn(rows, 8, generator=g)
    m = anchored_right_multiplier(ce, ce.clone(), ce[:0], erase_scale=1.0, preserve_scale=0.0, lamb=lamb)
    assert m.rank == 0


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 6))
def test_small_lambda_without_preserve_maps_targets_onto_anchors(seed, rows):
    g = torch.Generator().manual_seed(seed)
    ce, ca, w = torch.randn(rows, 12, generator=g), torch.randn(rows, 12, generator=g), torch.randn(7, 12, generator=g)
    m = anchored_right_multiplier(ce, ca, ce[:0], erase_scale=1.0, preserve_scale=0.0, lamb=1e-8)
    new = w.double() + m.up_for(w) @ m.Q
    torch.testing.assert_close(new @ ce.double().T, w.double() @ ca.double().T, rtol=1e-5, atol=1e-5)
