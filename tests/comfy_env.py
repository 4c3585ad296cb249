"""Where the real ComfyUI is (COMFYUI_PATH), and why its tests skip when it is not."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def comfyui_path() -> str | None:
    """COMFYUI_PATH if it points at a ComfyUI tree, else None."""
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.exists(os.path.join(path, "comfy", "model_patcher.py")):
        return path
    return None


def _comfyui_skip_reason() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "COMFYUI_PATH is not set; export it to a ComfyUI 0.3.64 tree to run the real-ComfyUI tests"
    return f"COMFYUI_PATH={path} is not a ComfyUI tree (no comfy/model_patcher.py)"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def merges_file() -> str | None:
    """A CLIP BPE merges file: shared data beside the checkout, or the open-clip-torch wheel's."""
    shared = os.path.join(ROOT, "..", "shared", "data", "clip_tokenizer", "merges.txt")
    if os.path.exists(shared):
        return shared
    from erasure_core import ConfigError
    from erasure_core.text.clip import find_merges_file

    try:
        return find_merges_file()
    except ConfigError:
        return None



def import_pack(name: str) -> ModuleType:
    """The repository imported as package ``name``, the way ComfyUI imports a custom node pack."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
