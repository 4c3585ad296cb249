"""Save Erasure's file, without ComfyUI: names per architecture, storage modes, errors, metadata and
byte-identical output for equal inputs (ComfyUI's loader is checked in tests/integration)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from comfy_env import ROOT
from safetensors import safe_open

from erasure_core import ArchitectureError, PatchEntry, PatchSet, reference_site_shapes
from erasure_core.formats.lora_out import (
    LORA_FORMAT_NAME,
    DenseAs,
    lora_bytes,
    module_names,
    patch_architecture,
    save_lora,
)
from erasure_core.formats.safetensors_out import safetensors_bytes

META = {"method": "uce", "seconds": 1.25, "concepts": {"targets": [{"name": "Van Gogh", "anchor": "a painter"}],
                                                        "preserve": [], "templates": {}},
        "config": {"lamb": 0.1}, "core_version": "0.2.0"}


def _patch(arch="sd1", dense_every=3, rank=2, seed=0, meta=META):
    g = torch.Generator().manual_seed(seed)
    shapes = {k: s for k, s in reference_site_shapes(arch).items() if "attn2" in k}
    entries = {}
    for i, (key, (d_out, d_in)) in enumerate(sorted(shapes.items())):
        if i % dense_every == 0:  # a full-rank difference
            entries[key] = PatchEntry(diff=torch.randn(d_out, d_in, generator=g) * 1e-3)
        else:
            entries[key] = PatchEntry(up=torch.randn(d_out, rank, generator=g),
                                      down=torch.randn(rank, d_in, generator=g) * 1e-3)
    return PatchSet(entries, meta)


def _read(data: bytes, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_sd1_names_are_kohyas_diffusers_names():
    names, naming = module_names(_patch("sd1"))
    assert names["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert names["diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_v.weight"] == \
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_v"
    assert names["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == \
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert names["diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"] == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"
    assert "diffusers" in naming and len(set(names.values())) == 32


def test_sdxl_names_are_kohyas_ldm_names():
    patch = _patch("sdxl", dense_every=50)
    assert patch_architecture(patch).name == "sdxl"
    names, naming = module_names(patch)
    assert names["diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    assert "LDM" in naming and len(set(names.values())) == 140


def test_a_non_standard_unet_falls_back_to_ldm_names():
    key = "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"  # a 1-res-block UNet
    patch = PatchSet({key: PatchEntry(up=torch.ones(640, 1), down=torch.ones(1, 768))})
    names, naming = module_names(patch)
    assert names[key] == "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" and "not the standard" in naming


@pytest.mark.parametrize("precision,tol", [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 1e-2)])
def test_stored_product_reproduces_every_delta(tmp_path, precision, tol):
    patch = _patch("sd1")
    data, report = lora_bytes(patch, precision=precision)
    tensors, meta = _read(data, tmp_path)
    names, _ = module_names(patch)
    for key, entry in patch.entries.items():
        n = names[key]
        if entry.is_low_rank:
            alpha, up, down = tensors[f"{n}.alpha"], tensors[f"{n}.lora_up.weight"], tensors[f"{n}.lora_down.weight"]
            assert float(alpha) == up.shape[1]  # scale alpha / r = 1
            stored = up.float() @ down.float()
        else:
            stored = tensors[f"{n}.diff"].float()
        err = float((stored - entry.dense()).norm() / entry.dense().norm())
        assert err <= tol
    assert report.max_error <= tol and report.differences == 11 and report.low_rank == 21
    assert meta["format"] == LORA_FORMAT_NAME and meta["concept_erasure.family"] == "SD1"


def test_dense_entries_compress_to_the_asked_error(tmp_path):
    g = torch.Generator().manual_seed(3)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    low = torch.randn(320, 4, generator=g) @ torch.randn(4, 768, generator=g)
    patch = PatchSet({key: PatchEntry(diff=low + 1e-4 * torch.randn(320, 768, generator=g))})
    data, report = lora_bytes(patch, dense_as=DenseAs.LOW_RANK, max_rank=16, max_error=0.01, precision="float32")
    tensors, meta = _read(data, tmp_path)
    assert report.compressed == 1 and report.compressed_ranks == (4,) and report.max_error <= 0.01
    assert "max_rank" in json.loads(meta["concept_erasure.storage"])
    assert not any(k.endswith(".diff") for k in tensors)


def test_metadata_names_method_concepts_config_version_family(tmp_path):
    _, meta = _read(lora_bytes(_patch("sd2"))[0], tmp_path)
    assert meta["concept_erasure.method"] == "uce" and meta["concept_text"] == "Van Gogh"
    assert json.loads(meta["concept_erasure.config"]) == {"lamb": 0.1}
    assert json.loads(meta["concept_erasure.concepts"])["targets"][0]["anchor"] == "a painter"
    assert meta["concept_erasure.family"] == "SD2" and meta["ss_base_model_version"] == "sd_v2"
    from erasure_core import __version__
    assert meta["concept_erasure.version"] == __version__
    assert "seconds" not in meta["concept_erasure.meta"]  # run time: would make equal inputs differ


def test_equal_inputs_give_identical_bytes_across_processes(tmp_path):
    """safetensors' own writer orders metadata differently per process; ours does not."""
    code = ("import sys, torch, hashlib; sys.path.insert(0, 'tests/core'); from test_lora_out import _patch; "
            "from erasure_core.formats.lora_out import lora_bytes; "
            "print(hashlib.sha256(lora_bytes(_patch('sd1'))[0]).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={"PYTHONPATH": f"{ROOT}:{ROOT}/tests", "PYTHONHASHSEED": str(i)}).stdout
               for i in range(2)}
    a = lora_bytes(_patch("sd1", meta={**META, "seconds": 9.0}))[0]
    import hashlib
    assert digests == {hashlib.sha256(a).hexdigest() + "\n"}


def test_writer_matches_safetensors_reader_for_every_dtype(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.tensor(2.5),
               "c": torch.randn(3, 2, dtype=torch.bfloat16), "d": torch.arange(4, dtype=torch.int64)}
    read, meta = _read(safetensors_bytes(tensors, {"z": "1", "a": "2"}), tmp_path)
    assert meta == {"z": "1", "a": "2"}
    for k, t in tensors.items():
        assert read[k].dtype == t.dtype and torch.equal(read[k], t)


def test_unknown_keys_and_empty_patches_are_refused(tmp_path):
    with pytest.raises(ArchitectureError, match="match none"):
        lora_bytes(PatchSet({"diffusion_model.foo.weight": PatchEntry(diff=torch.ones(2, 3))}))
    path = tmp_path / "none.safetensors"
    with pytest.raises(Exception, match="empty"):
        save_lora(str(path), PatchSet({}))
    assert not path.exists()
