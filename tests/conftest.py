"""Shared fixtures. ComfyUI-backed tests live under tests/integration and skip without it."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture
def encoder():
    from fakes import tiny_encoder

    return tiny_encoder()


@pytest.fixture
def sites():
    from fakes import tiny_sites

    return tiny_sites()


@pytest.fixture
def model_folder(tmp_path, monkeypatch):
    """``model_folder(folder_paths, name, extensions)``: a new empty ``tmp_path / name`` registered
    as ``folder_paths``' model folder ``name`` (stub or real; the registry and the real one's
    listing cache are restored after the test)."""

    def register(folder_paths, name: str, extensions: set[str]):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setattr(folder_paths, "folder_names_and_paths",
                            {**folder_paths.folder_names_and_paths, name: ([str(folder)], extensions)})
        if hasattr(folder_paths, "filename_list_cache"):
            monkeypatch.setattr(folder_paths, "filename_list_cache", {})
        return folder

    return register


from comfy_env import _comfyui_skip_reason, comfyui_path, merges_file  # noqa: E402


def pytest_report_header(config):
    if comfyui_path() is None:
        return f"real-ComfyUI tests skipped: {_comfyui_skip_reason()}"
    return f"real-ComfyUI tests use COMFYUI_PATH={comfyui_path()}"


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is not None:
        return
    skip = pytest.mark.skip(reason=_comfyui_skip_reason())
    for item in items:
        if "comfyui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def clip_tokenizer():
    from erasure_core.text.clip import BPETokenizer

    path = merges_file()
    if path is None:
        pytest.skip("no CLIP merges file: pip install open-clip-torch (or run beside ../shared)")
    return BPETokenizer(path)
