"""ComfyUI adapters. NODES is the menu order."""

from __future__ import annotations

from .closed_form_erase import ClosedFormErase
from .load_concepts import LoadConcepts, MergeConcepts, SaveConcepts
from .method_options import RealEraOptions, RECEOptions, SPEEDOptions

NODES = [LoadConcepts, MergeConcepts, SaveConcepts, ClosedFormErase, SPEEDOptions, RECEOptions, RealEraOptions]

from .apply_spm import ApplySPM  # noqa: E402

NODES.append(ApplySPM)

from .apply_eraser import ApplyEraserLoRA, ExtractEraser  # noqa: E402

NODES += [ApplyEraserLoRA, ExtractEraser]

__all__ = ["NODES"]
