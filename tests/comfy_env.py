"""Where the real ComfyUI is (COMFYUI_PATH), and why its tests skip when it is not."""

from __future__ import annotations

import os


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
    from erasure_core.clip_text import find_merges_file

    try:
        return find_merges_file()
    except ConfigError:
        return None

