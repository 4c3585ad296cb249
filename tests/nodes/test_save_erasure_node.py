"""Save Erasure as a node, stubbed and real: the file lands in models/loras, names and overwrite are
checked before any work, and the node reports what it wrote (its equality with ComfyUI's own LoRA
loader is tests/integration/test_save_erasure_comfyui.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open


@pytest.fixture
def loras_dir(env, model_folder):
    return model_folder(env.comfy["folder_paths"], "loras", {".safetensors"})


def _patch(env):
    core = env.core
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    g = torch.Generator().manual_seed(0)
    return core.PatchSet({key: core.PatchEntry(up=torch.randn(320, 2, generator=g), down=torch.randn(2, 768, generator=g)),
                          key.replace("to_k", "to_v"): core.PatchEntry(diff=torch.randn(320, 768, generator=g) * 1e-3)},
                         {"method": "uce", "concepts": {"targets": [{"name": "Van Gogh"}]}, "config": {}})


def _save(env, patch, filename, **options):
    node = env.pack.nodes.save_erasure.SaveErasure
    values = {"overwrite": False, "dense_as": "weight difference", "max_rank": 64, "max_error": 0.01,
              "precision": "float16"}
    return node.execute(patch=patch, filename=filename, **(values | options))


def test_saves_a_lora_in_models_loras_and_reports_it(env, loras_dir):
    out = _save(env, _patch(env), "no_van_gogh")
    path, report = out.result
    assert path == str(loras_dir / "no_van_gogh.safetensors")
    with safe_open(path, framework="pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
    assert keys == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.diff"]
    assert meta["concept_text"] == "Van Gogh" and meta["concept_erasure.family"] == "SD1"
    assert "1 low-rank (exact factors), 1 as weight differences" in report
    payload = out.ui["ce_report"][0]
    assert payload["title"] == "Save Erasure" and payload["bars"][0]["value"] < 2e-3


def test_an_existing_file_is_kept_unless_overwrite(env, loras_dir):
    (loras_dir / "kept.safetensors").write_bytes(b"old")
    with pytest.raises(env.core.PatchError, match="Save Erasure, input 'filename': .*exists"):
        _save(env, _patch(env), "kept.safetensors")
    assert (loras_dir / "kept.safetensors").read_bytes() == b"old"
    _save(env, _patch(env), "kept.safetensors", overwrite=True)
    assert (loras_dir / "kept.safetensors").read_bytes() != b"old"


@pytest.mark.parametrize("name", ["../escape", "sub/dir.safetensors", "", ".hidden"])
def test_names_with_folders_are_refused_before_any_work(env, loras_dir, name):
    with pytest.raises(env.core.PatchError, match="input 'filename'"):
        _save(env, "not even a patch", name)
    assert list(loras_dir.parent.rglob("*.safetensors")) == []


def test_a_patch_for_no_supported_architecture_names_the_patch(env, loras_dir):
    bad = env.core.PatchSet({"diffusion_model.foo.weight": env.core.PatchEntry(diff=torch.ones(2, 3))})
    with pytest.raises(env.core.ErasureError, match="input 'patch'"):
        _save(env, bad, "bad")
    assert list(loras_dir.iterdir()) == []
