"""How several SPM membranes combine into one edit.

Two ways to combine K membranes with multipliers ``m_k`` (``COMBINATIONS``):

* ``paper``: ``dW = sum_k m_k (alpha_k / r_k) U_k D_k`` -- linear in each ``m_k``, the paper's
  formulation and what ``merge_spm.py`` does. Stored exactly as one LoRA of rank ``sum_k r_k``
  (ups scaled and concatenated, downs concatenated).
* ``reference code``: what ``infer_spm.py`` does: every tensor of every file (ups and downs) is
  multiplied by ``m_k`` and summed across files, and the layers keep the scale
  ``alpha / rank`` of the first file's metadata, so ``dW = s (sum_k m_k U_k)(sum_k m_k D_k)``: one
  membrane acts with ``m^2``, several as a product of sums (cross terms included).

Pure torch; never imports ComfyUI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConceptError, ConfigError
from ..formats.spm import SPMFile

__all__ = ["COMBINATIONS", "PAPER", "REFERENCE", "combine"]

PAPER = "paper"
REFERENCE = "reference code"
COMBINATIONS = (PAPER, REFERENCE)


def combine(spms: Sequence[SPMFile], multipliers: Sequence[float], mode: str = PAPER
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The effective low-rank factors ``module name -> (up [out, R], down [R, in])`` of K
    membranes applied with multipliers ``m_k``: the weight change is ``up @ down`` (reshaped to
    the weight), scale included. See the module docstring for the two modes.

    ``paper``: modules whose every multiplier is 0 are left out (they would add nothing).
    ``reference code``: every file must have the same modules and rank (the script asserts the
    same), and the scale is the first file's.
    """
    if mode not in COMBINATIONS:
        raise ConfigError(f"combination must be one of {COMBINATIONS}, but got {mode!r}.", input_name="mode")
    if len(spms) != len(multipliers):
        raise ConfigError(f"need one multiplier per SPM, but got {len(multipliers)} for {len(spms)}.",
                          input_name="strength")
    if not spms:
        return {}
    if mode == PAPER:
        names = sorted({n for s in spms for n in s.modules})
        out = {}
        for name in names:
            ups, downs = [], []
            for spm, m in zip(spms, multipliers, strict=True):
                module = spm.modules.get(name)
                if module is None or m == 0:
                    continue
                up, down = module.factors()
                ups.append(up * (m * module.scale))
                downs.append(down)
            if ups:
                out[name] = (torch.cat(ups, 1), torch.cat(downs, 0))
        return out
    first = spms[0]
    for spm in spms[1:]:
        if set(spm.modules) != set(first.modules) or spm.rank != first.rank:
            raise ConceptError(
                f"'reference code' mode sums the files tensor by tensor, so every SPM must have the same "
                f"modules and rank, but '{spm.name}' differs from '{first.name}'. Use the 'facilitated "
                "transport' mode (the paper's sum), which combines any files.", input_name="mode")
    if all(m == 0 for m in multipliers):
        return {}
    scale = first.reference_scale
    out = {}
    for name in sorted(first.modules):
        up = sum(m * spm.modules[name].factors()[0] for spm, m in zip(spms, multipliers, strict=True))
        down = sum(m * spm.modules[name].factors()[1] for spm, m in zip(spms, multipliers, strict=True))
        out[name] = (up * scale, down)
    return out
