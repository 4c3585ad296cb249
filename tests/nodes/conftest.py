"""Node-tier fixtures: the pack against the stubs (always) and against the real ComfyUI (when
COMFYUI_PATH is set), so the same tests check both the nodes and the stubs' fidelity."""

from __future__ import annotations

import comfy_stubs
import pytest
from comfy_env import _comfyui_skip_reason, comfyui_path


@pytest.fixture
def stub_env():
    """The pack imported under fresh stubs; sys.modules is restored after the test."""
    with comfy_stubs.stubbed_pack() as env:
        yield env


@pytest.fixture(params=["stub", pytest.param("real", marks=pytest.mark.comfyui)])
def env(request):
    """The pack against the stubs, then against the real ComfyUI API."""
    if request.param == "stub":
        with comfy_stubs.stubbed_pack() as env:
            yield env
        return
    path = comfyui_path()
    if path is None:
        pytest.skip(_comfyui_skip_reason())
    yield comfy_stubs.real_pack(path)


@pytest.fixture
def erasers(stub_env, model_folder):
    """An empty ``models/erasers`` folder registered with the stub ``folder_paths``."""
    return model_folder(stub_env.comfy["folder_paths"], "erasers", {".safetensors", ".pt"})
