"""all_finite: one sum instead of a mask, exact whatever the values."""

from __future__ import annotations

import pytest
import torch

from erasure_core.numeric import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_element_anywhere_is_found(dtype, bad):
    t = torch.randn(300, 7).to(dtype)
    assert all_finite(t)
    t[123, 4] = bad
    assert not all_finite(t)


def test_finite_values_whose_sum_overflows_are_still_finite():
    big = torch.full((4, 4), 3e38)  # the float32 sum is inf; every element is finite
    assert torch.isinf(big.sum()) and all_finite(big)
    half = torch.full((100,), 60000.0, dtype=torch.float16)  # float16's own sum would overflow
    assert all_finite(half)


def test_opposite_infinities_do_not_cancel_into_a_finite_sum():
    t = torch.tensor([float("inf"), float("-inf"), 1.0])
    assert not all_finite(t)


def test_empty_and_integer_tensors_are_finite():
    assert all_finite(torch.zeros(0, 3)) and all_finite(torch.arange(5))
