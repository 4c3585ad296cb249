"""Save Erasure in a real ComfyUI (in-process, --cpu) on the tiny SD1.5 checkpoint: ComfyUI's own
LoraLoaderModelOnly on the saved file reproduces Closed-Form Erase's patched weights, Apply Eraser
LoRA reads the file back (and gates it from its metadata), names are checked before any work."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.comfyui

P = "diffusion_model."
K = P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
# Tolerance of the reproduction, relative to the largest entry of each weight's edit: float32 files
# differ only by the order of the float32 product (ours vs ComfyUI's), float16 by rounding the factors.
TOL = {"float32": 1e-5, "float16": 2e-3}


@pytest.fixture
def loras(pack, model_folder):
    import folder_paths

    model_folder(folder_paths, "erasers", {".safetensors"})
    return model_folder(folder_paths, "loras", set(folder_paths.supported_pt_extensions))


def _run(node_cls, **inputs):
    with torch.inference_mode():
        return node_cls.execute(**inputs)


def _erase(model, clip, targets, **options):
    from concept_erasure_pack.nodes.closed_form_erase import ClosedFormErase
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    (concepts,) = _run(LoadConcepts, targets=targets, anchors="a painter", preserve="Rembrandt", kind="generic",
                       preset="none", file="none", templates="as given", custom_templates="")
    values = {"method": "uce", "strength": 1.0, "token_pick": "last subject token", "erase_scale": 1.0,
              "preserve_scale": 0.1, "lamb": 0.5, "preserve_empty_prompt": True, "solve_dtype": "float64"}
    out = _run(ClosedFormErase, model=model, clip=clip, concepts=concepts, **(values | options))
    return out.result[0], out.result[1]


def _save(patch, filename, **options):
    from concept_erasure_pack.nodes.save_erasure import SaveErasure

    values = {"overwrite": False, "dense_as": "weight difference", "max_rank": 64, "max_error": 0.01,
              "precision": "float32"}
    out = _run(SaveErasure, patch=patch, filename=filename, **(values | options))
    return out.result[0], out.result[1], out.ui


def effective(patcher, key):
    from concept_erasure_pack.nodes import _comfy

    return _comfy._effective_weight(patcher.get_key_patches()[key], key, torch.device("cpu"))()


def _lora_loader(model, name):
    import nodes  # ComfyUI's own built-in nodes

    with torch.inference_mode():
        return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]


def _worst(a_model, b_model, base_model, keys):
    """Largest |W_a - W_b| over the edit's largest |W_a - W_0|, per weight (the max over keys)."""
    out = 0.0
    for key in keys:
        w0, wa, wb = (effective(m, key).detach() for m in (base_model, a_model, b_model))
        out = max(out, float((wa - wb).abs().max() / (wa - w0).abs().max()))
    return out


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("targets,dense", [("Van Gogh", False), ("; ".join(f"painter number {i}" for i in range(12)),
                                                                   True)])
def test_comfyuis_lora_loader_reproduces_closed_form_erase(tiny_checkpoint, loras, caplog, precision, targets, dense):
    model, clip, _ = tiny_checkpoint
    erased, patch = _erase(model, clip, targets,
                           token_pick="last word + EOT + padding" if dense else "last subject token")
    assert any(not e.is_low_rank for e in patch.entries.values()) == dense
    path, report, ui = _save(patch, f"erase_{precision}_{dense}", precision=precision)
    assert os.path.dirname(path) == str(loras) and path.endswith(".safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = _lora_loader(model, os.path.basename(path))
    assert "lora key not loaded" not in caplog.text  # every module of the file found its weight
    assert set(loaded.patches) == set(patch.keys())
    worst = _worst(loaded, erased, model, patch.keys())
    print(f"LoraLoaderModelOnly vs Closed-Form Erase, {precision}, dense={dense}: worst {worst:.2e}")
    assert worst <= TOL[precision], worst
    assert f"{len(patch)} modules" in report and ui["ce_report"][0]["bars"][0]["value"] <= TOL[precision]
    assert not model.patches  # the input model is never patched


def test_apply_eraser_lora_reads_the_file_and_gates_it(pack, tiny_checkpoint, loras):
    from concept_erasure_pack.nodes.apply_eraser import ApplyEraserLoRA

    model, clip, _ = tiny_checkpoint
    erased, patch = _erase(model, clip, "Van Gogh")
    path, _, _ = _save(patch, "no_van_gogh.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["concept_text"] == "Van Gogh" and meta["concept_erasure.family"] == "SD1"
    gate = {"gate": "facilitated transport", "gate_threshold": 0.95, "facilitate_factor": 1.0, "concept_text": ""}
    common = {"model": model, "clip": clip, "eraser": "loras/no_van_gogh.safetensors", "strength": 1.0}
    on = _run(ApplyEraserLoRA, **common, prompt="Van Gogh", **gate)
    off = _run(ApplyEraserLoRA, **common, prompt="a bowl of ramen", **gate)
    assert "kohya LoRA" in on.result[2] and "gate 1.000" in on.result[2] and "gate 0.000" in off.result[2]
    assert _worst(on.result[0], erased, model, patch.keys()) <= TOL["float32"]
    assert torch.equal(effective(off.result[0], K), effective(model, K))


def test_names_and_overwrite_are_checked_before_any_work(pack, tiny_checkpoint, loras):
    from concept_erasure_pack.erasure_core import ErasureError

    model, clip, _ = tiny_checkpoint
    _, patch = _erase(model, clip, "Van Gogh")
    path, _, _ = _save(patch, "kept")
    before = open(path, "rb").read()
    with pytest.raises(ErasureError, match="Save Erasure.*overwrite") as err:
        _save(patch.scaled(2.0), "kept.safetensors")
    assert err.value.input_name == "filename" and open(path, "rb").read() == before
    for bad in ("../escape", "sub/name", ".hidden", "  "):
        with pytest.raises(ErasureError, match="plain file name"):
            _save(patch, bad)
    _save(patch.scaled(2.0), "kept", overwrite=True)
    assert open(path, "rb").read() != before
    assert sorted(os.listdir(loras)) == ["kept.safetensors"]  # no temporary files left


def test_sd1_names_are_what_comfyui_maps_for_a_full_size_unet(pack):
    """The diffusers names written for SD1.x/SD2.x are ComfyUI's own (comfy.utils.unet_to_diffusers on
    the SD1.5 UNet config), for all 32 K/V weights of the full-size model."""
    import comfy.utils
    from concept_erasure_pack.erasure_core import PatchEntry, PatchSet, reference_site_shapes
    from concept_erasure_pack.erasure_core.formats.lora_out import module_names

    config = dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                  transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1)
    ldm_of = {"lora_unet_" + d[: -len(".weight")].replace(".", "_"): P + ldm
              for d, ldm in comfy.utils.unet_to_diffusers(config).items()}
    shapes = {k: s for k, s in reference_site_shapes("sd1").items() if "attn2" in k}
    patch = PatchSet({k: PatchEntry(up=torch.ones(s[0], 1), down=torch.ones(1, s[1])) for k, s in shapes.items()})
    names, naming = module_names(patch)
    assert "diffusers" in naming and {ldm_of[n] for n in names.values()} == set(shapes)
    assert all(ldm_of[n] == k for k, n in names.items())
