"""Apply SPM inside a real ComfyUI (in-process, --cpu) on the tiny SD1.5 checkpoint, with an SPM
file written in the released format."""

from __future__ import annotations

import pytest
import tiny_spm
import torch
from sampling import loaded_state, sample

pytestmark = pytest.mark.comfyui

FT, ALWAYS_ON, REFERENCE = "facilitated transport", "always on", "reference code"
UNRELATED = "a red barn in a wheat field"


@pytest.fixture(scope="module")
def spm_folder(pack, tiny_state_dict, tmp_path_factory):
    """models/spm with snoopy.safetensors (SPM) and mickey.safetensors; a plain LoRA in loras."""
    import folder_paths

    folder = tmp_path_factory.mktemp("spm")
    loras = tmp_path_factory.mktemp("loras")
    files = {"snoopy": tiny_spm.write_spm(folder / "snoopy.safetensors", tiny_state_dict, "snoopy", seed=1),
             "mickey": tiny_spm.write_spm(folder / "mickey.safetensors", tiny_state_dict, "mickey mouse, mickey",
                                          seed=2),
             "plain": tiny_spm.write_spm(loras / "plain.safetensors", tiny_state_dict, None, seed=3)}
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in ("spm", "loras")}
    folder_paths.folder_names_and_paths["spm"] = ([str(folder)], {".safetensors"})
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
    yield files
    for k, v in saved.items():
        if v is None:
            folder_paths.folder_names_and_paths.pop(k, None)
        else:
            folder_paths.folder_names_and_paths[k] = v


def _apply(model, clip, prompt="snoopy", mode=FT, factor=1.0, **slots):
    from concept_erasure_pack.nodes.apply_spm import ApplySPM

    inputs = {f"{name}_{k}": default for k in range(1, 5)
              for name, default in (("spm", "none"), ("strength", 1.0), ("concepts", ""))}
    with torch.inference_mode():
        out = ApplySPM.execute(model=model, clip=clip, prompt=prompt, mode=mode, facilitate_factor=factor,
                               **(inputs | slots))
    return out.result[0], out.result[1], out.ui


def _weight(model, key):
    """The weight ``model`` computes with, from the unpatched base and its patch list."""
    import comfy.lora

    base = model.get_key_patches("diffusion_model.")[key][0][0].float().clone()
    return comfy.lora.calculate_weight(model.patches.get(key, []), base, key)


def _gate(report, name):
    line = next(x for x in report.splitlines() if x.startswith(name))
    return float(line.split("gate ")[1].split(" ")[0])


def test_a_released_format_spm_patches_every_transformer_module(pack, tiny_checkpoint, spm_folder):
    model, clip, _ = tiny_checkpoint
    n_modules = len(spm_folder["snoopy"]) // 3
    assert n_modules == 7 * 12  # 7 transformers x (proj_in, proj_out, 8 attention, 2 ff)
    patched, report, _ = _apply(model, clip, spm_1="snoopy.safetensors")
    assert f"{n_modules} weights patched" in report
    assert len(patched.patches) == n_modules
    # a 1x1-conv proj_in gets exactly up @ down (gate 1: the prompt is the concept)
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    sd = spm_folder["snoopy"]
    up = sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].float().flatten(1)
    down = sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].float().flatten(1)
    expected = _weight(model, key) + (up @ down).reshape(_weight(model, key).shape)
    torch.testing.assert_close(_weight(patched, key), expected, rtol=1e-4, atol=1e-4)


def test_ft_gate_follows_the_prompt_and_the_input_model_is_untouched(pack, tiny_checkpoint, spm_folder):
    model, clip, _ = tiny_checkpoint
    before = loaded_state(model)
    patches_before, uuid_before = dict(model.patches), model.patches_uuid

    target, target_report, ui = _apply(model, clip, prompt="snoopy", spm_1="snoopy.safetensors")
    assert _gate(target_report, "snoopy") == pytest.approx(1.0, abs=1e-3)
    assert ui["text"] == [target_report]  # the gates are shown on the node
    other, other_report, _ = _apply(model, clip, prompt=UNRELATED, spm_1="snoopy.safetensors")
    gate = _gate(other_report, "snoopy")
    # by hand: no shared token, so the gate is the cosine of the flattened 77x768 encodings
    a, b = (clip.encode_from_tokens({"l": [clip.tokenize(t)["l"][0]]}).double().flatten() for t in (UNRELATED, "snoopy"))
    assert "tokenuni 0.000" in other_report and gate == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-3)
    # the tiny checkpoint's random CLIP makes unrelated 77-token sequences similar (the padding rows
    # dominate the flattened cosine), so its gate is well below 1 but not near 0
    assert gate < 0.9

    full, _, _ = _apply(model, clip, mode=ALWAYS_ON, spm_1="snoopy.safetensors", strength_1=1.0)
    at_gate, _, _ = _apply(model, clip, mode=ALWAYS_ON, spm_1="snoopy.safetensors", strength_1=gate)
    original_t = sample(model, clip, "snoopy")
    target_t = sample(target, clip, "snoopy")
    full_t = sample(full, clip, "snoopy")
    torch.testing.assert_close(target_t, full_t)  # the target prompt gets the full membrane
    assert (target_t - original_t).norm() > 0.02 * original_t.norm()

    original_u = sample(model, clip, UNRELATED)
    other_u = sample(other, clip, UNRELATED)
    full_u = sample(full, clip, UNRELATED)
    at_gate_u = sample(at_gate, clip, UNRELATED)
    moved, moved_full = (other_u - original_u).norm(), (full_u - original_u).norm()
    assert (other_u - at_gate_u).norm() < 0.02 * moved  # acts at its gate (report rounds it to 3 digits)
    assert moved < 0.95 * moved_full

    after = loaded_state(model)  # the original loaded again: backups restored
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.patches == patches_before and model.patches_uuid == uuid_before


def test_facilitate_factor_zero_samples_like_the_original(pack, tiny_checkpoint, spm_folder):
    model, clip, _ = tiny_checkpoint
    off, report, _ = _apply(model, clip, prompt=UNRELATED, factor=0.0, spm_1="snoopy.safetensors")
    assert "0 weights patched" in report
    torch.testing.assert_close(sample(off, clip, UNRELATED), sample(model, clip, UNRELATED))


def test_several_spms_combine_as_the_paper_and_as_the_reference_code(pack, tiny_checkpoint, spm_folder):
    model, clip, _ = tiny_checkpoint
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    u = {f: spm_folder[f][f"{name}.lora_up.weight"].float() for f in ("snoopy", "mickey")}
    d = {f: spm_folder[f][f"{name}.lora_down.weight"].float() for f in ("snoopy", "mickey")}
    prompt = "snoopy meets mickey mouse"  # both gates 1: every token of a concept is in the prompt
    paper, report, _ = _apply(model, clip, prompt=prompt, spm_1="snoopy.safetensors", spm_2="mickey.safetensors")
    assert _gate(report, "snoopy") == pytest.approx(1.0) and _gate(report, "mickey") == pytest.approx(1.0)
    base = _weight(model, key)
    torch.testing.assert_close(_weight(paper, key) - base, u["snoopy"] @ d["snoopy"] + u["mickey"] @ d["mickey"],
                               rtol=1e-4, atol=1e-5)
    ref, _, _ = _apply(model, clip, prompt=prompt, mode=REFERENCE, spm_1="snoopy.safetensors",
                       spm_2="mickey.safetensors", strength_1=0.5, strength_2=0.5)
    expected = (0.5 * u["snoopy"] + 0.5 * u["mickey"]) @ (0.5 * d["snoopy"] + 0.5 * d["mickey"])
    torch.testing.assert_close(_weight(ref, key) - base, expected, rtol=1e-4, atol=1e-5)


def test_plain_lora_needs_a_concept_and_mismatches_are_refused(pack, tiny_checkpoint, spm_folder, tmp_path):
    import folder_paths
    from concept_erasure_pack.erasure_core import ArchitectureError, ConceptError

    model, clip, _ = tiny_checkpoint
    with pytest.raises(ConceptError, match="Apply SPM, input 'concepts_1'"):
        _apply(model, clip, spm_1="loras/plain.safetensors")
    _, report, _ = _apply(model, clip, prompt="snoopy", spm_1="loras/plain.safetensors", concepts_1="snoopy")
    assert "gate 1.000" in report

    spm_dir = folder_paths.folder_names_and_paths["spm"][0][0]
    sd = dict(spm_folder["snoopy"])
    wide = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    sd[wide] = torch.zeros(1, 2048).half()  # an SDXL-width context
    from safetensors.torch import save_file

    save_file(sd, f"{spm_dir}/sdxl_like.safetensors", {"prompts": "snoopy", "rank": "1", "alpha": "1.0"})
    with pytest.raises(ArchitectureError, match="input 'spm_1'.*attn2_to_k"):
        _apply(model, clip, spm_1="sdxl_like.safetensors")
