"""The shared solve against a per-layer float64 solve written straight from UCE's eq. 7."""

from __future__ import annotations

import pytest
import torch

from erasure_core import NumericalError
from erasure_core.edit.linalg import anchored_right_multiplier


def _keys(rows, d, seed):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _per_layer_reference(w, ce, ca, cp, s, sp, lamb):
    """W = (λW₀ + s Σ W₀c_a c_eᵀ + s_p Σ W₀c_p c_pᵀ)(λI + s Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ)⁻¹, per layer."""
    w, ce, ca, cp = (t.double() for t in (w, ce, ca, cp))
    d = w.shape[1]
    mat1 = lamb * w + s * (w @ ca.T) @ ce + sp * (w @ cp.T) @ cp
    mat2 = lamb * torch.eye(d, dtype=torch.float64) + s * ce.T @ ce + sp * cp.T @ cp
    return mat1 @ torch.linalg.inv(mat2)


@pytest.mark.parametrize("chunk", [8192, 7])  # rows converted to float64 all at once / 7 at a time
@pytest.mark.parametrize("rows", [3, 40])  # fewer and more target rows than the width
def test_shared_solve_equals_per_layer_float64_reference(rows, chunk, monkeypatch):
    monkeypatch.setattr("erasure_core.edit.linalg.GRAM_CHUNK", chunk)
    d = 24
    ce, ca, cp = _keys(rows, d, 1), _keys(rows, d, 2), _keys(10, d, 3)
    mult = anchored_right_multiplier(ce, ca, cp, erase_scale=1.3, preserve_scale=0.7, lamb=0.5)
    assert mult.rank <= min(rows, d)
    assert mult.full == (rows > d)  # more moving rows than the width: kept whole, no SVD
    for seed, d_out in [(4, 16), (5, 40)]:
        w = _keys(d_out, d, seed)
        got = w.double() + mult.up_for(w) @ mult.Q
        torch.testing.assert_close(got, _per_layer_reference(w, ce, ca, cp, 1.3, 0.7, 0.5), rtol=1e-9, atol=1e-9)


def test_float32_and_float64_solves_agree():
    ce, ca, cp = _keys(5, 16, 1), _keys(5, 16, 2), _keys(8, 16, 3)
    w = _keys(12, 16, 4)
    deltas = []
    for dtype in (torch.float32, torch.float64):
        m = anchored_right_multiplier(ce, ca, cp, erase_scale=1.0, preserve_scale=0.1, lamb=0.5, dtype=dtype)
        deltas.append((m.up_for(w) @ m.Q).double())
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-4, atol=1e-5)


def test_rows_equal_to_their_anchor_add_no_rank():
    ce = _keys(4, 16, 1)
    ca = ce.clone()
    ca[0] += 1.0
    m = anchored_right_multiplier(ce, ca, ce[:0], erase_scale=1.0, preserve_scale=0.0, lamb=0.5)
    assert m.rank == 1


def test_singular_system_raises_numerical_error_naming_lamb():
    ce = _keys(2, 16, 1)
    with pytest.raises(NumericalError, match="singular") as err:
        anchored_right_multiplier(ce, _keys(2, 16, 2), ce[:0], erase_scale=1.0, preserve_scale=0.0, lamb=0.0)
    assert err.value.input_name == "lamb"


def test_non_finite_keys_raise_numerical_error_naming_the_method():
    ce = _keys(2, 16, 1)
    ce[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="UCE"):
        anchored_right_multiplier(ce, _keys(2, 16, 2), ce[:0], erase_scale=1.0, preserve_scale=0.0,
                                  lamb=0.5, method="UCE")


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_least_amplified_direction_matches_the_svd_up_to_sign(shape):
    from erasure_core.edit.linalg import least_amplified_direction

    w = _keys(shape[0], shape[1], 5).double()
    expected = torch.linalg.svd(w, full_matrices=False).Vh[-1]
    got = least_amplified_direction(w)
    torch.testing.assert_close(got * torch.sign(got @ expected), expected, rtol=1e-4, atol=1e-5)  # float32


@pytest.mark.parametrize("rows", [5, 40])
def test_projector_from_rows_equals_the_full_eigendecomposition(rows):
    from erasure_core.edit.linalg import low_eigen_projector, low_eigen_projector_of_rows

    r = _keys(rows, 24, 6).double()
    full = low_eigen_projector(r.T @ r / rows, 0.1)
    torch.testing.assert_close(low_eigen_projector_of_rows(r, 0.1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("width", [16, 300, 257])  # below / above the width of the block form; 257: uneven blocks
def test_gram_equals_the_plain_product(width):
    from erasure_core.edit.linalg import gram

    rows = _keys(50, width, 9)
    torch.testing.assert_close(gram(rows, torch.float64), rows.double().T @ rows.double(), rtol=1e-12, atol=1e-12)


def test_few_rows_against_a_wide_key_solve_through_woodbury_and_agree_with_the_d_by_d_form():
    from erasure_core.edit import linalg

    gen = torch.Generator().manual_seed(3)
    ce, ca, cp = (torch.randn(n, 64, generator=gen, dtype=torch.float64) for n in (5, 5, 9))
    kw = {"erase_scale": 1.0, "preserve_scale": 0.3, "lamb": 0.5}
    fast = linalg.anchored_right_multiplier(ce, ca, cp, **kw)  # 14 rows < 64 / 2: Woodbury
    a = 0.5 * torch.eye(64, dtype=torch.float64) + ce.T @ ce + 0.3 * cp.T @ cp
    torch.testing.assert_close(fast.Q, torch.linalg.solve(a, ce.T).T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.P, (ca - ce).T)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_cross_gram_over_repeated_rows_equals_the_plain_product(side):
    # every target paired with one anchor: the anchor's 7 rows recur once per target
    from erasure_core.edit import linalg

    other = _keys(140, 300, 3)
    repeated = _keys(7, 300, 4).repeat(20, 1)
    left, right = (repeated, other) if side == "left" else (other, repeated)
    assert linalg._distinct_rows(repeated) is not None  # the grouped form is taken
    want = left.double().T @ right.double()
    torch.testing.assert_close(linalg.cross_gram(left, right, torch.float64), want, rtol=1e-12, atol=1e-10)


def test_a_projection_collision_falls_back_to_the_plain_product(monkeypatch):
    # a probe that maps every row to one key groups distinct rows together: the exact check refuses it
    from erasure_core.edit import linalg

    monkeypatch.setattr(linalg, "_PROBES", {(300, torch.device("cpu")): torch.zeros(300)})
    left, right = _keys(100, 300, 5), _keys(100, 300, 6)
    assert linalg._distinct_rows(left) is None
    torch.testing.assert_close(linalg.cross_gram(left, right, torch.float64), left.double().T @ right.double(),
                               rtol=1e-12, atol=1e-10)


def test_the_few_rows_form_keeps_its_digits_at_a_tiny_ridge():
    # (I − UᵀK⁻¹U)/λ lost 1e-5 of the mapping here (seed 31772, λ 1e-8); K⁻¹U loses none
    g = torch.Generator().manual_seed(31772)
    ce, ca, w = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g), torch.randn(7, 12, generator=g)
    m = anchored_right_multiplier(ce, ca, ce[:0], erase_scale=1.0, preserve_scale=0.0, lamb=1e-8)
    new = w.double() + m.up_for(w) @ m.Q
    assert (new @ ce.double().T - w.double() @ ca.double().T).abs().max() < 1e-6


def test_a_remembered_gram_is_exact_and_never_stale():
    from erasure_core.edit import linalg

    memo = linalg._GramMemo(limit=64 << 20, smallest=0)
    rows = _keys(3000, 300, 11)
    calls = []

    def compute():
        calls.append(1)
        return rows.double().T @ rows.double()

    first = memo.get(rows, torch.float64, compute)
    again = memo.get(rows.clone(), torch.float64, compute)  # equal rows, another tensor: remembered
    assert len(calls) == 1 and torch.equal(first, again)
    again.add_(1.0)  # a caller adding in place does not change what is remembered
    assert torch.equal(memo.get(rows, torch.float64, compute), first) and len(calls) == 1
    rows[17, 3] += 1e-3  # one changed value: computed again, from the new rows
    fresh = memo.get(rows, torch.float64, compute)
    assert len(calls) == 2
    torch.testing.assert_close(fresh, rows.double().T @ rows.double(), rtol=0, atol=0)
    # whole-number rows sum exactly: two values swapped between rows keep the sum (the lookup key)
    # but change the rows and their Gram; the bit-for-bit comparison catches it
    rows = torch.randint(-8, 8, (3000, 300), generator=torch.Generator().manual_seed(2)).float()
    before = memo.get(rows, torch.float64, compute)
    while rows[5, 3] == rows[6, 3] or rows[5, 4] == rows[6, 4]:
        rows[6, 3] += 1
        rows[6, 4] -= 1
    rows[5, 3], rows[6, 3] = rows[6, 3].item(), rows[5, 3].item()
    after = memo.get(rows, torch.float64, compute)
    assert len(calls) == 4 and not torch.equal(before, after)
    torch.testing.assert_close(after, rows.double().T @ rows.double(), rtol=0, atol=0)
