"""Imports run one way: down the layers of ARCHITECTURE.md §1, never up.

Core (``erasure_core``), lowest first: ``errors``/``version``/``numeric``/``atomic`` < ``config`` < ``concepts``,
``architectures``, ``text/``, ``edit/`` < ``formats/``, ``gating/`` < ``methods/``, ``attacks/`` <
the package root (``__init__``, the public API) < ``__main__`` (the CLI). Nodes: ``types`` <
``_comfy/`` and ``_schema`` < the node modules < ``nodes/__init__``. ``_comfy/`` is the only part
of the pack that imports ComfyUI internals (``comfy.*``, ``folder_paths``).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE_RANKS = {"errors": 0, "version": 0, "numeric": 0, "atomic": 0, "config": 1, "concept_text": 1, "concepts": 2, "architectures": 2, "text": 2, "edit": 2,
              "formats": 3, "gating": 3, "methods": 4, "attacks": 4, "__init__": 5, "__main__": 6,
              "cli": 6}
NODE_RANKS = {"types": 0, "_comfy": 1, "_schema": 1, "_report": 1, "_chart": 1, "__init__": 3}  # every other node module: 2
COMFY_INTERNALS = {"comfy", "folder_paths", "comfy_extras", "comfy_execution", "server", "execution"}


def _module_parts(path: pathlib.Path, package: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(package).with_suffix("").parts)
    return parts


def _relative_targets(path: pathlib.Path, package: pathlib.Path) -> list[tuple[list[str], int]]:
    """Each relative import of ``path`` as a module path under ``package`` (``[]`` is the package
    root), with its line."""
    parts = _module_parts(path, package)
    here = parts[:-1]  # the package that holds the module (``__init__`` holds its own package)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
            if node.level - 1 > len(here):
                continue  # leaves this package (nodes -> erasure_core): checked elsewhere
            target = base + (node.module.split(".") if node.module else [])
            names = [alias.name for alias in node.names]
            for name in names:  # ``from pkg import x``: x is a submodule, or a name of pkg itself
                sub = package.joinpath(*target, name)
                is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                out.append((target + [name] if is_module else target, node.lineno))
    return out


def _rank(parts: list[str], ranks: dict[str, int], default: int | None) -> int:
    head = parts[0] if parts else "__init__"
    if head in ranks:
        return ranks[head]
    assert default is not None, f"module {'.'.join(parts)} has no layer: add it to the ranks in this test"
    return default


def _offenders(package: pathlib.Path, ranks: dict[str, int], default: int | None) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        parts = _module_parts(path, package)
        source = _rank(parts, ranks, default)
        for target, line in _relative_targets(path, package):
            rank = _rank(target, ranks, default)
            if rank > source:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {'.'.join(target) or '<package root>'} "
                           f"(layer {rank} > {source})")
    return bad


def test_core_imports_never_run_upward():
    assert _offenders(ROOT / "erasure_core", CORE_RANKS, None) == []


def test_node_imports_never_run_upward():
    assert _offenders(ROOT / "nodes", NODE_RANKS, 2) == []


def test_only_the_comfy_adapters_import_comfyui_internals():
    bad = []
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        if "_comfy" in path.relative_to(ROOT / "nodes").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            roots = set()
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            if roots & COMFY_INTERNALS:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {sorted(roots & COMFY_INTERNALS)}")
    assert bad == []


def test_layering_test_sees_an_upward_import(tmp_path):
    """The checker itself: a low module importing a higher one is reported."""
    pkg = tmp_path / "erasure_core"
    (pkg / "edit").mkdir(parents=True)
    (pkg / "edit" / "linalg.py").write_text("from ..methods.uce import solve\n")
    (pkg / "methods").mkdir()
    (pkg / "methods" / "uce.py").write_text("from ..edit.linalg import x\nfrom .. import __version__\n")
    (pkg / "methods" / "__init__.py").write_text("from . import uce\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _offenders(pkg, CORE_RANKS, None)
    finally:
        ROOT = saved
    assert len(found) == 2, found
    assert "edit/linalg.py:1 imports methods.uce" in found[0]
    assert "methods/uce.py:2 imports <package root>" in found[1]


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for d in ("nodes", "erasure_core") for p in (ROOT / d).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
