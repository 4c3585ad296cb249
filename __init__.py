"""Concept Erasure for ComfyUI: erase concepts from diffusion models inside a workflow.

Outside ComfyUI (pytest collecting the repository, packaging tools) there is no ``comfy_api``
to register nodes with, so this module then defines nothing; ``erasure_core`` works on its own.
"""

from __future__ import annotations

import importlib.util

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import NODES
    from .nodes.types import ComfyExtension

    class ConceptErasureExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> ConceptErasureExtension:
        return ConceptErasureExtension()

    __all__ += ["comfy_entrypoint"]
