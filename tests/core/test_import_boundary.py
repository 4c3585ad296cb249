"""erasure_core is pure torch: no module in it imports ComfyUI."""

from __future__ import annotations

import ast
import pathlib

CORE = pathlib.Path(__file__).resolve().parents[2] / "erasure_core"
FORBIDDEN = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server",
             "nodes", "execution", "latent_preview"}


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_never_imports_comfyui():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 10
    offenders = {str(f.relative_to(CORE)): sorted(_imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
