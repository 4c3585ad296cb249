"""SPEED's prior bank, layer by layer: influence-based prior filtering (IPF), directed prior
augmentation (DPA) and the null-space projector of the refined bank (research/algorithms.md §2.2,
steps 2-6), vectorised over the whole bank.

What the reference code does per layer and chunk of 128 priors, this module does at once, with the
same noise draws and the same decisions:

* The plain erase ``ΔW_erase = W (AᵀC₁ − C₁ᵀC₁)(I + C₁ᵀC₁)⁻¹`` has rank at most the number of
  target rows R, so ``ΔW_erase r`` for every prior is ``(R_bank L)(F Wᵀ)`` with ``L [d, R]`` and
  ``F [R, d]`` shared by all layers: no ``d × d`` product per layer.
* An augmented prior is ``c + z v_min``, so its influence is ``‖a + z b‖`` with ``a = ΔW_erase c``
  and ``b = ΔW_erase v_min``: ``‖a‖² + 2z a·b + z²‖b‖²``, for every sample without forming it.
* Every kept sample lies in ``span(priors) ⊕ v_min``. With fewer priors than the key width the
  covariance's eigenvectors above the threshold are found in that ``(n + 1)``-dimensional span
  (one QR of the bank, shared by all layers); the rest of the space has eigenvalue 0, below any
  positive threshold, so the projector is the same as from the full ``d × d`` eigenproblem.
  Otherwise the bank's Gram is assembled from the kept priors and rank-2 corrections for the
  samples, and the ``d × d`` eigenproblem is solved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..edit.linalg import least_amplified_direction, low_eigen_projector

__all__ = ["DPA_CHUNK", "PriorBank", "prior_bank", "refined_projector"]

DPA_CHUNK = 128  # the reference filters augmentations per chunk of 128 kept priors


@dataclass(frozen=True)
class PriorBank:
    """The retain keys and what every layer's filter and projector reuse.

    ``rows [n, d]``; the plain erase is ``ΔW_erase = W (left @ right)ᵀ`` with ``left [d, r]`` and
    ``right [r, d]`` (``None``: the identity, when the targets fill the width); ``lead = rows @ left``;
    ``basis [d, n]``: an orthonormal basis of the rows' span, or ``None`` for the ``d × d`` path."""

    rows: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor | None
    lead: torch.Tensor
    basis: torch.Tensor | None


def prior_bank(rows: torch.Tensor, c1tc1: torch.Tensor, ce: torch.Tensor, diff: torch.Tensor,
               threshold: float) -> PriorBank:
    """The bank of retain keys ``rows [n, d]`` for the target statistics ``C₁ᵀC₁ [d, d]``, target
    rows ``ce [R, d]`` and averaged differences ``diff = (A − C₁)/n [R, d]``."""
    d = c1tc1.shape[0]
    ridge = torch.eye(d, dtype=c1tc1.dtype, device=c1tc1.device) + c1tc1  # symmetric positive definite
    if len(ce) < d:  # ΔW_erase ᵀ = (I + C₁ᵀC₁)⁻¹ C₁ᵀ (A − C₁)/n, in two thin factors
        left, right = torch.linalg.solve(ridge, ce.T), diff
    else:
        left, right = torch.linalg.solve(ridge, ce.T @ diff), None
    basis = torch.linalg.qr(rows.T).Q if len(rows) + 1 < d and threshold > 0 else None
    return PriorBank(rows, left, right, rows @ left, basis)


@torch.no_grad()
def refined_projector(bank: PriorBank, w: torch.Tensor, *, aug_num: int, disable_filter: bool,
                      threshold: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's null-space projector ``P [d, d]`` of its refined bank (IPF, then DPA), and
    ``U [d, k]`` with ``P = I − U Uᵀ`` when that low-rank form is known (else ``None``).

    ``w [d_out, d]`` is the layer's weight in the solve dtype; ``generator`` draws the noise in
    the reference's order (one ``[len, aug_num, 1]`` normal draw per chunk of kept priors)."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=w.dtype, device=w.device)
    gain = w.T if bank.right is None else bank.right @ w.T  # [r, d_out]
    a = bank.lead @ gain  # ΔW_erase c for every prior, [n, d_out]
    if disable_filter:
        kept = torch.arange(len(a), device=w.device)
    else:  # IPF: priors the plain erase moves more than average
        influence = a.norm(dim=1)
        kept = torch.nonzero(influence > influence.mean()).flatten()
    if len(kept) == 0:
        return eye, torch.zeros(d, 0, dtype=w.dtype, device=w.device)
    v = least_amplified_direction(w)  # DPA's direction: W's least-amplified input
    b = (v @ bank.left) @ gain  # ΔW_erase v, [d_out]
    ak = a[kept]
    z = torch.cat([torch.randn(len(part), aug_num, 1, generator=generator, dtype=w.dtype)
                   for part in kept.split(DPA_CHUNK)])[..., 0].to(w.device)  # [k, aug_num]
    infl = ((ak * ak).sum(1, keepdim=True) + 2 * z * (ak @ b)[:, None] + z * z * (b @ b)).clamp_min(0).sqrt()
    chunk = torch.arange(len(kept), device=w.device) // DPA_CHUNK
    means = torch.zeros(int(chunk[-1]) + 1, dtype=w.dtype, device=w.device).index_add_(0, chunk, infl.sum(1))
    means /= torch.bincount(chunk).to(w.dtype) * aug_num
    keep = infl > means[chunk][:, None]  # [k, aug_num]: the samples DPA adds
    prior, sample = torch.nonzero(keep, as_tuple=True)
    total = len(kept) + len(prior)
    rows = bank.rows[kept]
    if bank.basis is not None:  # the (n + 1)-dimensional span of the priors and v
        off = v - bank.basis @ (bank.basis.T @ v)
        span = torch.cat([bank.basis, (off / off.norm())[:, None]], dim=1) if off.norm() > 1e-8 else bank.basis
        coords, coord_v = rows @ span, v @ span
        x = torch.cat([coords, coords[prior] + z[prior, sample, None] * coord_v])
        values, vectors = torch.linalg.eigh(x.T @ x / total)
        big = span @ vectors[:, values >= threshold]
        return eye - big @ big.T, big
    # Σ samples sᵀs, s = c + z v: Σ c cᵀ (per kept copy) + u vᵀ + v uᵀ + (Σ z²) v vᵀ, u = Σ z c
    zk = torch.where(keep, z, torch.zeros_like(z))
    copies = 1 + keep.sum(1).to(w.dtype)
    u = zk.sum(1) @ rows
    g = (rows * copies[:, None]).T @ rows + torch.outer(u, v) + torch.outer(v, u) + (zk * zk).sum() * torch.outer(v, v)
    return low_eigen_projector(g / total, threshold), None
