"""ComfyUI adapters. NODES is the menu order."""

from __future__ import annotations

from .closed_form_erase import ClosedFormErase
from .load_concepts import LoadConcepts, MergeConcepts, SaveConcepts

NODES = [LoadConcepts, MergeConcepts, SaveConcepts, ClosedFormErase]

__all__ = ["NODES"]
