"""The one module that imports ComfyUI's node API; custom socket types are declared here once."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["CONCEPTS", "OPTIONS", "PATCH", "ComfyExtension", "io", "ui"]

CONCEPTS = io.Custom("CE_CONCEPTS")
"""A ConceptSet: targets, anchors, preserve concepts (from Load Concepts)."""

PATCH = io.Custom("CE_PATCH")
"""A PatchSet: the weight edit a method computed, for saving, inspecting or re-applying."""

OPTIONS = io.Custom("CE_CF_OPTIONS")
"""A closed-form method's config (from an options node), for Closed-Form Erase."""
