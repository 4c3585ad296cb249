"""RECE's closed-form adversarial embedding, as an attack (research/attacks_eval.md §A.6).

For the concept prompt's encoded rows ``c [T, d]``, the rows ``c'`` minimising
``Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖²`` over every K/V site ``l`` (``W'`` erased, ``W`` original):
the conditioning the erased cross-attention maps closest to what the original made of the concept.
Exact (recovery → 1 as λ → 0) for any edit that only changes the K/V projections with an
invertible net effect (UCE, MACE's refinement, our Closed-Form Erase); approximate for erasures
that touch other layers. The algebra is :func:`erasure_core.edit.linalg.ridge_preimage_rows`, shared
with RECE's erasure.
"""

from __future__ import annotations

import torch

from ..edit.linalg import check_finite, ridge_preimage_rows
from ..errors import ConfigError
from .recovery import KVGrams

__all__ = ["closed_form_attack"]


@torch.no_grad()
def closed_form_attack(concept_rows: torch.Tensor, grams: KVGrams, reg: float) -> torch.Tensor:
    """Adversarial rows ``[T, d]`` (float32) for the concept's encoded rows ``[T, d]``.

    ``reg`` is λ, relative to the mean eigenvalue of ``Σ W'ᵀW'`` so one value means the same on
    every model size (``λ_abs = reg · tr(G')/d``); RECE's absolute 1e-3 / 1e-1 were for SD1.4's
    32 sites, whose ``tr(G')/d`` is of order 1.
    """
    if reg < 0 or not torch.isfinite(torch.tensor(reg)):
        raise ConfigError(f"reg must be ≥ 0 and finite, but got {reg}.", input_name="reg")
    if concept_rows.shape[-1] != grams.width:
        raise ConfigError(
            f"the concept's encoding must have the width the cross-attention reads ({grams.width}), but "
            f"it has {concept_rows.shape[-1]}. Connect the CLIP of this checkpoint.", input_name="clip")
    scale = float(torch.trace(grams.erased)) / grams.width
    rows = ridge_preimage_rows(concept_rows.to(grams.erased), grams.erased, grams.cross, reg * scale)
    return check_finite(rows, "the adversarial embedding", "closed_form attack").float()
