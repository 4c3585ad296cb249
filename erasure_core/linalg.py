"""Closed-form algebra shared by every method: the only home of solves and projectors.

The UCE family (UCE, RECE, MACE's closed-form refinement, TRCE stage 1) minimises, per site,

    Σ_e s‖W c_e − W₀ c_a(e)‖² + Σ_p s_p‖W c_p − W₀ c_p‖² + λ‖W − W₀‖²

(UCE, arXiv 2308.14761, eq. 7). Writing key rows as matrices ``C_e, C_a, C_p`` (``[R, d_in]``),
the minimiser is ``W = W₀ M`` with the same right multiplier ``M`` for every site of width
``d_in``:

    M − I = s (C_a − C_e)ᵀ C_e A⁻¹,   A = λI + s C_eᵀC_e + s_p C_pᵀC_p

so one ``d_in × d_in`` solve serves every site, and each site's delta ``W₀ (M − I)`` has rank at
most ``min(R, d_in)``: ``up = W₀ P`` and ``down = Q`` with ``P = s (C_a − C_e)ᵀ``, ``Q = C_e A⁻¹``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NumericalError

__all__ = ["RightMultiplier", "anchored_right_multiplier", "check_finite", "compact", "factor_square", "gram",
           "kmeans", "least_amplified_direction", "low_eigen_projector",
           "low_eigen_projector_of_rows", "ridge_preimage_rows", "solve_right"]


def check_finite(tensor: torch.Tensor, what: str, method: str) -> torch.Tensor:
    """Raise NumericalError naming ``what`` and ``method`` when ``tensor`` has NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(
            f"{method}: {what} must be finite, but got NaN or inf. Raise 'lamb' (the ridge "
            "term), lower 'erase_scale', or use solve_dtype float64.",
            input_name="lamb",
        )
    return tensor


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rowsᵀ rows`` for key rows ``[R, d]`` -> ``[d, d]`` (zero when R = 0)."""
    return rows.T @ rows


@dataclass(frozen=True)
class RightMultiplier:
    """``M − I = P Q`` for one input width: ``P [d_in, r]``, ``Q [r, d_in]``.

    A site's delta is ``(W₀ P) Q``: apply it with :meth:`up_for` and share ``Q`` across sites.
    """

    P: torch.Tensor
    Q: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.Q.shape[0])

    def up_for(self, weight: torch.Tensor) -> torch.Tensor:
        """``W₀ P`` for one site's weight ``[d_out, d_in]`` -> ``[d_out, r]`` in P's dtype."""
        return weight.to(device=self.P.device, dtype=self.P.dtype) @ self.P


@torch.no_grad()
def anchored_right_multiplier(
    target_keys: torch.Tensor,
    anchor_keys: torch.Tensor,
    preserve_keys: torch.Tensor,
    *,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
    dtype: torch.dtype = torch.float64,
    method: str = "closed-form",
) -> RightMultiplier:
    """Solve the anchored ridge problem once for all sites of this key width.

    ``target_keys`` / ``anchor_keys``: ``[R, d]`` paired rows (row r of a target maps to the
    original output of row r of its anchor); ``preserve_keys``: ``[R_p, d]``. Solved with a
    Cholesky factorisation of the symmetric ``A`` (never an explicit inverse) in ``dtype``.
    When R exceeds d the factors are compressed to rank ≤ d by an SVD of ``P Q``.
    """
    ce = target_keys.to(dtype)
    ca = anchor_keys.to(device=ce.device, dtype=dtype)
    cp = preserve_keys.to(device=ce.device, dtype=dtype)
    d = ce.shape[1]
    # Rows whose target and anchor keys coincide (the shared start token, identical padding)
    # contribute nothing to P; drop them from P and Q but keep them in A, where they still act.
    moving = (ca - ce).abs().amax(dim=1) > 0
    a = lamb * torch.eye(d, dtype=dtype, device=ce.device)
    a += erase_scale * gram(ce) + preserve_scale * gram(cp)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise NumericalError(
            f"{method}: the key system must be positive definite, but it is singular (lamb="
            f"{lamb}, {ce.shape[0]} target rows, {cp.shape[0]} preserved rows, width {d}). "
            "Set 'lamb' above 0 (the papers use 0.5).",
            input_name="lamb",
        )
    q = torch.cholesky_solve(ce[moving].T, chol).T  # C_e A⁻¹: [r, d] (A is symmetric)
    p = erase_scale * (ca[moving] - ce[moving]).T  # [d, r]
    check_finite(q, "the solved key factor", method)
    return compact(p, q)


def compact(p: torch.Tensor, q: torch.Tensor) -> RightMultiplier:
    """``P Q`` with rank at most ``d``: when ``P`` has more columns than rows, the product is
    re-factored by an SVD that drops singular values at rounding level."""
    d = p.shape[0]
    if p.shape[1] <= d:
        return RightMultiplier(P=p, Q=q)
    return RightMultiplier(*_svd_factors(p @ q))


def factor_square(m: torch.Tensor) -> RightMultiplier:
    """A ``d x d`` matrix ``M − I`` (or any square edit) as low-rank factors ``P Q``."""
    return RightMultiplier(*_svd_factors(m))


def _svd_factors(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m)
    keep = s > s.max() * m.shape[0] * torch.finfo(m.dtype).eps if s.numel() else s > 0
    return u[:, keep] * s[keep], vh[keep]


def least_amplified_direction(w: torch.Tensor) -> torch.Tensor:
    """Unit ``v`` of the input space that ``w [d_out, d_in]`` amplifies least among its row space
    (the last right singular vector of the reduced SVD), from the eigen-decomposition of the
    smaller Gram matrix: several times faster than an SVD of ``w``."""
    dtype, w = w.dtype, w.float()  # a direction for augmentation noise: float32 is ample, and faster
    if w.shape[0] < w.shape[1]:
        _, vectors = torch.linalg.eigh(w @ w.T)
        v = w.T @ vectors[:, 0]
    else:
        _, vectors = torch.linalg.eigh(w.T @ w)
        v = vectors[:, 0]
    return (v / v.norm().clamp_min(torch.finfo(w.dtype).tiny)).to(dtype)


def solve_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b a⁻¹`` for a square, possibly non-symmetric ``a`` (``torch.linalg.solve``, no inverse)."""
    return torch.linalg.solve(a.T, b.T).T


def ridge_preimage_rows(rows: torch.Tensor, gram_edited: torch.Tensor, cross: torch.Tensor, reg: float) -> torch.Tensor:
    """Rows ``x`` minimising ``Σ_l ‖W'_l x − W_l c‖² + reg ‖x‖²`` for each row ``c`` of ``rows [T, d]``.

    ``gram_edited = Σ_l W'_lᵀ W'_l`` and ``cross = Σ_l W'_lᵀ W_l`` (``[d, d]``, summed over the sites):
    ``x = (G' + reg I)⁻¹ X c``, written for rows as ``c Xᵀ (G' + reg I)⁻¹``. This is RECE's
    ``close_regzero`` adversarial embedding (arXiv 2407.12383): the input that the edited
    projections map closest to what the original ones made of ``c``.
    """
    eye = torch.eye(gram_edited.shape[0], dtype=gram_edited.dtype, device=gram_edited.device)
    try:
        return solve_right(gram_edited + reg * eye, rows @ cross.T)
    except RuntimeError as exc:  # torch.linalg.LinAlgError: singular system
        raise NumericalError(
            f"the adversarial embedding's system must be non-singular, but it is singular at reg={reg}. "
            "Raise the regularisation above 0.", input_name="reg") from exc


def low_eigen_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector onto the eigenvectors of the symmetric ``cov`` whose eigenvalue is below
    ``threshold`` (SPEED's null space of the retain covariance)."""
    values, vectors = torch.linalg.eigh(cov)
    small = vectors[:, values < threshold]
    return small @ small.T


def low_eigen_projector_of_rows(rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`low_eigen_projector` of the covariance ``rowsᵀrows / n`` of ``rows [n, d]``.

    With fewer rows than dimensions the covariance has rank at most ``n``: its eigenvalues outside
    the row space are 0 (below any positive threshold), so only an ``n × n`` eigenproblem inside the
    row space is solved. Same projector as the full ``d × d`` one, much faster for small ``n``.
    """
    n, d = rows.shape
    cov_scale = 1.0 / max(n, 1)
    if n >= d or threshold <= 0:
        return low_eigen_projector(rows.T @ rows * cov_scale, threshold)
    basis, _ = torch.linalg.qr(rows.T)  # [d, n]: orthonormal basis of the row space
    inside = rows @ basis  # [n, n]
    values, vectors = torch.linalg.eigh(inside.T @ inside * cov_scale)
    big = basis @ vectors[:, values >= threshold]
    return torch.eye(d, dtype=rows.dtype, device=rows.device) - big @ big.T


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Centroids ``[k, d]`` of the rows of ``x`` (Lloyd's algorithm, k-means++ start from
    ``generator``, so a fixed seed gives fixed centroids)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        if float(dist.sum()) == 0:
            centres.append(x[int(torch.randint(len(x), (1,), generator=generator))])
            continue
        centres.append(x[int(torch.multinomial(dist / dist.sum(), 1, generator=generator))])
    c = torch.stack(centres)
    for _ in range(iterations):
        label = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack([x[label == j].mean(0) if (label == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return c
