"""Real ComfyUI, in-process: COMFYUI_PATH on sys.path, --cpu, our pack imported as a package."""

from __future__ import annotations

import sys

import pytest
from comfy_env import comfyui_path, import_pack

PACK_NAME = "concept_erasure_pack"


def _setup_comfy():
    path = comfyui_path()
    if path is None:
        pytest.skip("ComfyUI not available (see the header for why)")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: no GPU here


@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """The repository imported the way ComfyUI imports a custom node pack (ComfyUI's user folder,
    where the encoding cache lives, redirected to a temporary folder)."""
    _setup_comfy()
    import folder_paths

    folder_paths.set_user_directory(str(tmp_path_factory.mktemp("comfy_user")))
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    return import_pack(PACK_NAME)


@pytest.fixture(scope="session")
def tiny_state_dict():
    _setup_comfy()
    import tiny_sd15

    return tiny_sd15.build_state_dict()


@pytest.fixture(scope="session")
def tiny_checkpoint(pack, tiny_state_dict):
    """(model, clip, vae) of the tiny SD1.5 checkpoint, loaded by ComfyUI's own loader."""
    import comfy.sd

    model, clip, vae = comfy.sd.load_state_dict_guess_config(dict(tiny_state_dict))[:3]
    return model, clip, vae


@pytest.fixture
def folders(pack, model_folder):
    """An empty ``erasers`` folder registered with ComfyUI for this test."""
    import folder_paths

    return model_folder(folder_paths, "erasers", {".safetensors", ".pt", ".bin", ".ckpt", ".pth"})
