"""ComfyUI adapters. NODES is the menu order."""

from __future__ import annotations

from .apply_eraser import ApplyEraserLoRA
from .apply_spm import ApplySPM
from .attack_prompt import AttackPrompt
from .closed_form_erase import ClosedFormErase
from .extract_eraser import ExtractEraser
from .load_concepts import LoadConcepts, MergeConcepts, SaveConcepts
from .method_options import RealEraOptions, RECEOptions, SPEEDOptions, UCEOptions

NODES = [LoadConcepts, MergeConcepts, SaveConcepts, ClosedFormErase, UCEOptions, SPEEDOptions, RECEOptions, RealEraOptions,
         ApplySPM, ApplyEraserLoRA, ExtractEraser, AttackPrompt]

__all__ = ["NODES"]
