"""The CLI's LoRA in a real ComfyUI: ``python -m erasure_core erase`` on the tiny SD1.5 checkpoint
file (written at test time, loaded by ComfyUI's own checkpoint loader), then ComfyUI's
LoraLoaderModelOnly loads every module of the CLI's file and gives the weights of Closed-Form
Erase + Save Erasure run in the graph on the same checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from comfy_env import ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

P = "diffusion_model."
TARGETS, ANCHORS, PRESERVE = "Van Gogh; Claude Monet", "a painter", "Rembrandt"


@pytest.fixture(scope="module")
def checkpoint_file(tiny_state_dict, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, str(path))
    return path


def test_cli_lora_loads_in_comfyui_and_matches_the_graph(pack, checkpoint_file, model_folder, caplog):
    import comfy.sd
    import comfy.sd1_clip
    import folder_paths
    from test_save_erasure_comfyui import _erase, _save, _worst

    import nodes

    loras = model_folder(folder_paths, "loras", set(folder_paths.supported_pt_extensions))

    merges = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer", "merges.txt")
    run = subprocess.run(
        [sys.executable, "-m", "erasure_core", "erase", str(checkpoint_file), "--out", str(loras / "cli.safetensors"),
         "--targets", TARGETS, "--anchors", ANCHORS, "--preserve", PRESERVE, "--token-pick", "last subject token",
         "--lamb", "0.5", "--precision", "float32", "--merges", merges],  # the graph side's λ (_erase)
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "result: the erasure WORKED" in run.stdout

    model, clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint_file))[:2]
    erased, patch = _erase(model, clip, TARGETS, token_pick="last subject token")
    path, _, _ = _save(patch, "graph", precision="float32")
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "cli.safetensors", 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    assert set(loaded.patches) == set(patch.keys())  # every K/V weight of the model, from the CLI's file
    worst = _worst(loaded, erased, model, patch.keys())
    same_bytes = open(path, "rb").read() == (loras / "cli.safetensors").read_bytes()
    print(f"CLI LoRA in ComfyUI vs Closed-Form Erase in the graph: worst {worst:.2e}; identical bytes: {same_bytes}")
    # The CLI encodes with the core's CLIP, the graph with ComfyUI's: the same weights and math, float32
    # rounding apart; the edit itself agrees to this share of its largest entry.
    assert worst <= 1e-4, worst
    from safetensors import safe_open

    metas = []
    for file in (path, str(loras / "cli.safetensors")):
        with safe_open(file, framework="pt") as f:
            metas.append(f.metadata())
    assert metas[0] == metas[1]  # method, concepts, config, version, family: the same inputs
