"""ComfyUI adapters. NODES is the menu order; every node in it runs through the node-boundary
wrapper (``_schema.guard_node``)."""

from __future__ import annotations

from ._schema import guard_node
from .apply_eraser import ApplyEraserLoRA
from .apply_spm import ApplySPM
from .attack_prompt import AttackPrompt
from .closed_form_erase import ClosedFormErase
from .extract_eraser import ExtractEraser
from .load_concepts import LoadConcepts, MergeConcepts, SaveConcepts
from .method_options import RealEraOptions, RECEOptions, SPEEDOptions, UCEOptions
from .save_erasure import SaveErasure

NODES = [LoadConcepts, MergeConcepts, SaveConcepts, ClosedFormErase, SaveErasure, UCEOptions, SPEEDOptions,
         RECEOptions, RealEraOptions, ApplySPM, ApplyEraserLoRA, ExtractEraser, AttackPrompt]
for _node in NODES:
    guard_node(_node)

__all__ = ["NODES"]
