"""Apply Eraser LoRA and Extract Eraser in a real ComfyUI (in-process, --cpu) on the tiny SD1.5
checkpoint: one file per published format, written with the key names the papers' code writes,
checked on the effective weights of the patched clones; the input model and CLIP stay untouched."""

from __future__ import annotations

import json

import pytest
import torch
from fakes import Payload
from safetensors.torch import save_file

pytestmark = pytest.mark.comfyui

P = "diffusion_model."
K_COMFY = P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
V_COMFY = P + "output_blocks.2.1.transformer_blocks.0.attn2.to_v.weight"
K_DIFFUSERS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
V_DIFFUSERS = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
CLIP_FC1 = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


@pytest.fixture
def mc(tiny_checkpoint):
    model, clip, _ = tiny_checkpoint
    return model, clip


def _run(node_cls, **inputs):
    with torch.inference_mode():
        return node_cls.execute(**inputs)


def apply(pack, model, clip, eraser, strength=1.0, **options):
    from concept_erasure_pack.nodes.apply_eraser import ApplyEraserLoRA

    out = _run(ApplyEraserLoRA, model=model, clip=clip, eraser=eraser, strength=strength, **options)
    return (*out.result, out.ui)


def effective(patcher, key):
    """The weight ``patcher`` would produce, computed from its base weight and patch list."""
    from concept_erasure_pack.nodes import _comfy

    return _comfy._effective_weight(patcher.get_key_patches()[key], key, torch.device("cpu"))()


def base(patcher, key):
    return patcher.get_key_patches()[key][0][0].float().clone()


def untouched(model, clip):
    """Snapshot of the input model/CLIP patch state, to assert it did not change."""
    return (dict(model.patches), model.patches_uuid, dict(clip.patcher.patches), clip.patcher.patches_uuid,
            json.dumps(sorted(model.model_options.get("transformer_options", {}).get("patches", {}))))


def close(a, b, scale=1.0):
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=1e-5 * max(1.0, scale))


def diffusers_map(model):
    import comfy.utils

    keys = set(model.model_state_dict(filter_prefix=P))
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {k: P + v for k, v in mapping.items() if P + v in keys}


def test_diffusers_key_names_match_comfyui_keys(pack, mc):
    model, _ = mc
    mapping = diffusers_map(model)
    assert mapping[K_DIFFUSERS] == K_COMFY and mapping[V_DIFFUSERS] == V_COMFY


# -- LoRAs ------------------------------------------------------------------------------------------


def test_kohya_lora_patches_unet_and_clip(pack, mc, folders):
    """kohya sd-scripts / A1111 names (SPM, LECO and ACE erasers use them): lora_unet_<diffusers
    path with '_'>, lora_te_text_model_encoder_layers_N_<module>; .lora_down/.lora_up/.alpha."""
    model, clip = mc
    before = untouched(model, clip)
    g = torch.Generator().manual_seed(1)
    k_mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    te_mod = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    sd = {f"{k_mod}.lora_down.weight": torch.randn(4, 768, generator=g) * 0.1,
          f"{k_mod}.lora_up.weight": torch.randn(320, 4, generator=g) * 0.1, f"{k_mod}.alpha": torch.tensor(2.0),
          f"{te_mod}.lora_down.weight": torch.randn(4, 768, generator=g) * 0.1,
          f"{te_mod}.lora_up.weight": torch.randn(3072, 4, generator=g) * 0.1, f"{te_mod}.alpha": torch.tensor(4.0)}
    save_file(sd, str(folders / "kohya.safetensors"))
    m2, c2, report, _ = apply(pack, model, clip, "kohya.safetensors", strength=0.5)
    dk = sd[f"{k_mod}.lora_up.weight"] @ sd[f"{k_mod}.lora_down.weight"] * (2.0 / 4)
    dt = sd[f"{te_mod}.lora_up.weight"] @ sd[f"{te_mod}.lora_down.weight"] * (4.0 / 4)
    close(effective(m2, K_COMFY), base(model, K_COMFY) + 0.5 * dk)
    close(effective(c2.patcher, CLIP_FC1), base(clip.patcher, CLIP_FC1) + 0.5 * dt)
    assert "kohya LoRA" in report and "rank 4" in report and "1 UNet + 1 text-encoder" in report
    m3, c3, report, _ = apply(pack, model, None, "kohya.safetensors", strength=0.5)  # no CLIP connected
    close(effective(m3, K_COMFY), base(model, K_COMFY) + 0.5 * dk)
    assert c3 is None and "1 UNet + 0 text-encoder" in report and "1 text-encoder modules skipped" in report
    assert untouched(model, clip) == before


def test_mace_attn_processor_lora(pack, mc, folders):
    """MACE saves each concept's rank-1 LoRA with ``unet.save_attn_procs`` (old diffusers format):
    ``<block>.attn2.processor.to_k_lora.down.weight``, as a torch pickle of tensors."""
    model, clip = mc
    g = torch.Generator().manual_seed(2)
    stem = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora"
    sd = {f"{stem}.down.weight": torch.randn(1, 768, generator=g), f"{stem}.up.weight": torch.randn(320, 1, generator=g)}
    torch.save(sd, folders / "pytorch_lora_weights.bin")
    m2, c2, report, _ = apply(pack, model, clip, "pytorch_lora_weights.bin")
    close(effective(m2, K_COMFY), base(model, K_COMFY) + sd[f"{stem}.up.weight"] @ sd[f"{stem}.down.weight"])
    assert "diffusers/PEFT LoRA" in report and c2 is clip


def test_peft_lora(pack, mc, folders):
    """diffusers ``save_lora_weights`` with the PEFT backend (EraseAnything's format, here for SD1):
    ``unet.<module>.lora_A.weight`` / ``lora_B.weight``."""
    model, clip = mc
    g = torch.Generator().manual_seed(3)
    stem = "unet." + V_DIFFUSERS[: -len(".weight")]
    sd = {f"{stem}.lora_A.weight": torch.randn(8, 768, generator=g) * 0.1,
          f"{stem}.lora_B.weight": torch.randn(320, 8, generator=g) * 0.1}
    save_file(sd, str(folders / "peft.safetensors"))
    m2, _, report, _ = apply(pack, model, clip, "peft.safetensors", strength=2.0)
    close(effective(m2, V_COMFY), base(model, V_COMFY) + 2.0 * sd[f"{stem}.lora_B.weight"] @ sd[f"{stem}.lora_A.weight"])
    assert "rank 8" in report


def test_flux_lora_on_sd1_names_the_family(pack, mc, folders):
    """EraseAnything ships ``transformer.transformer_blocks.N.attn.add_k_proj.lora_A.weight`` [8, 3072]."""
    model, clip = mc
    sd = {"transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight": torch.zeros(8, 3072),
          "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight": torch.zeros(3072, 8)}
    save_file(sd, str(folders / "flux.safetensors"))
    with pytest.raises(pack.erasure_core.ErasureError, match="look like Flux"):
        apply(pack, model, clip, "flux.safetensors")


# -- weights ------------------------------------------------------------------------------------------


def test_esd_partial_diffusers_safetensors_scales_with_strength(pack, mc, folders):
    """ESD ``esd_sd.py`` saves only the trained parameters under diffusers names (esd-x: attn2)."""
    model, clip = mc
    g = torch.Generator().manual_seed(4)
    dk = torch.randn(320, 768, generator=g) * 0.01
    sd = {K_DIFFUSERS: base(model, K_COMFY) + dk,
          V_DIFFUSERS: base(model, V_COMFY),  # trained but unchanged: no patch
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias":
              base(model, P + "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias") + 0.5}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folders / "esd-vangogh-esdx.safetensors"))
    before = untouched(model, clip)
    m2, _, report, _ = apply(pack, model, clip, "esd-vangogh-esdx.safetensors", strength=0.5)
    close(effective(m2, K_COMFY), base(model, K_COMFY) + 0.5 * dk)
    bias = P + "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias"
    close(effective(m2, bias), base(model, bias) + 0.25)
    assert V_COMFY not in m2.patches and "2 of 3 UNet weights differ" in report
    assert untouched(model, clip) == before


def test_ldm_names_and_full_diffusers_unet_pt(pack, mc, folders):
    """CompVis checkpoints use ``model.diffusion_model.*``; the ESD paper's released
    ``diffusers-<concept>-ESDx1-UNET.pt`` is a full diffusers UNet state dict (torch.save)."""
    model, clip = mc
    dv = torch.full((320, 768), 0.003)
    ldm = {"model." + V_COMFY: base(model, V_COMFY) + dv}
    save_file(ldm, str(folders / "ldm.safetensors"))
    m2, _, report, _ = apply(pack, model, clip, "ldm.safetensors")
    close(effective(m2, V_COMFY), base(model, V_COMFY) + dv)
    assert "LDM names" in report

    full = {k: base(model, v) for k, v in diffusers_map(model).items()}
    full[K_DIFFUSERS] = full[K_DIFFUSERS] + dv
    torch.save(full, folders / "diffusers-VanGogh-ESDx1-UNET.pt")
    m3, _, report, _ = apply(pack, model, clip, "diffusers-VanGogh-ESDx1-UNET.pt")
    assert list(m3.patches) == [K_COMFY]
    close(effective(m3, K_COMFY), base(model, K_COMFY) + dv)
    assert f"1 of {len(full)} UNet weights differ" in report


def test_weights_for_another_architecture_name_the_first_key(pack, mc, folders):
    model, clip = mc
    save_file({K_DIFFUSERS: torch.zeros(320, 1024)}, str(folders / "sd2.safetensors"))
    with pytest.raises(pack.erasure_core.ErasureError, match="SD2"):
        apply(pack, model, clip, "sd2.safetensors")
    save_file({K_DIFFUSERS: torch.zeros(320, 768), "down_blocks.3.attentions.0.proj_in.weight": torch.zeros(8, 8)},
              str(folders / "deeper.safetensors"))
    with pytest.raises(pack.erasure_core.ErasureError, match=r"first: 'down_blocks\.3\.attentions\.0\.proj_in"):
        apply(pack, model, clip, "deeper.safetensors")
    save_file({K_DIFFUSERS: torch.zeros(640, 768)}, str(folders / "wide.safetensors"))
    with pytest.raises(pack.erasure_core.ErasureError, match=K_DIFFUSERS.replace(".", r"\.")):
        apply(pack, model, clip, "wide.safetensors")


def test_text_encoder_eraser_patches_the_clip(pack, mc, folders):
    """AdvUnlearn / few-shot erasing save a HF CLIPTextModel (``pytorch_model.bin``): keys
    ``text_model.encoder.layers.N...`` and ``text_model.embeddings.position_ids``."""
    model, clip = mc
    before = untouched(model, clip)
    state = {k[len("clip_l.transformer."):]: v.float().clone() for k, v in clip.cond_stage_model.state_dict().items()
             if k.startswith("clip_l.transformer.text_model.")}
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    delta = torch.randn(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape, generator=torch.Generator().manual_seed(5))
    state["text_model.encoder.layers.0.mlp.fc1.weight"] += 0.01 * delta
    sub = folders / "advunlearn"
    sub.mkdir()
    torch.save(state, sub / "pytorch_model.bin")
    m2, c2, report, _ = apply(pack, model, clip, "advunlearn/pytorch_model.bin", strength=1.5)
    assert m2 is model and c2 is not clip
    # the CLIP is float16: its diff patch is stored in float16 too (rounding of the small delta only)
    torch.testing.assert_close(effective(c2.patcher, CLIP_FC1), base(clip.patcher, CLIP_FC1) + 1.5 * 0.01 * delta,
                               rtol=0, atol=1.5 * 0.01 * float(delta.abs().max()) * 2e-3)
    assert list(c2.patcher.patches) == [CLIP_FC1] and "text-encoder weights" in report
    assert untouched(model, clip) == before


# -- Receler -----------------------------------------------------------------------------------------


def _receler(model, blocks, rank=4, seed=6, zero_up=False):
    g = torch.Generator().manual_seed(seed)
    widths = {"down_blocks.0.attentions.0": 320, "mid_block.attentions.0": 640, "up_blocks.1.attentions.1": 320}
    weights = {}
    for block in blocks:
        dim = widths[block]
        weights[block] = {"down.weight": torch.randn(rank, dim, generator=g) * 0.1,
                          "down.bias": torch.randn(rank, generator=g) * 0.1,
                          "up.weight": torch.zeros(dim, rank) if zero_up else torch.randn(dim, rank, generator=g),
                          "up.bias": torch.randn(dim, generator=g) * 0.1}
    return weights


def test_receler_adapters_as_attention_output_patches(pack, mc, folders):
    """Receler ``train_receler.py`` saves ``eraser_weights.pt`` (dict by diffusers block prefix, each
    ``{down.weight, down.bias, up.weight, up.bias}``) and ``eraser_config.json``."""
    model, clip = mc
    before = untouched(model, clip)
    blocks = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.1"]
    weights = _receler(model, blocks)
    sub = folders / "receler_vangogh"
    sub.mkdir()
    torch.save(weights, sub / "eraser_weights.pt")
    (sub / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": 4}))
    m2, _, report, _ = apply(pack, model, clip, "receler_vangogh/eraser_weights.pt", strength=0.5)
    (patch,) = m2.model_options["transformer_options"]["patches"]["attn2_output_patch"]
    assert set(patch.adapters) == {("input", 1), ("middle", 0), ("output", 3)}
    a = torch.randn(2, 16, 320)
    w = weights["down_blocks.0.attentions.0"]
    expected = a + 0.5 * (torch.nn.functional.gelu(a @ w["down.weight"].T + w["down.bias"]) @ w["up.weight"].T
                          + w["up.bias"])
    close(patch(a, {"block": ("input", 1), "block_index": 0}), expected)
    assert torch.equal(patch(a, {"block": ("input", 2), "block_index": 0}), a)
    assert "Receler adapters" in report and "rank 4" in report and "3 attention-output adapters" in report
    assert untouched(model, clip) == before


def test_receler_changes_sampling_only_when_nonzero(pack, mc, folders):
    from sampling import sample

    model, clip = mc
    blocks = ["down_blocks.0.attentions.0", "mid_block.attentions.0"]
    flat = {f"{b}.adapter.{k}": v for b, parts in _receler(model, blocks, zero_up=True).items() for k, v in parts.items()}
    flat = {k: (v if not k.endswith("up.bias") else torch.zeros_like(v)) for k, v in flat.items()}
    save_file(flat, str(folders / "zero.safetensors"))
    flat2 = {f"{b}.adapter.{k}": v for b, parts in _receler(model, blocks).items() for k, v in parts.items()}
    save_file(flat2, str(folders / "live.safetensors"))
    reference = sample(model, clip, "a cat", steps=1)
    zero = sample(apply(pack, model, clip, "zero.safetensors")[0], clip, "a cat", steps=1)
    live = sample(apply(pack, model, clip, "live.safetensors")[0], clip, "a cat", steps=1)
    torch.testing.assert_close(zero, reference)
    assert (live - reference).abs().max() > 1e-3


# -- stacking, refusal, extraction, gating --------------------------------------------------------------


def test_two_erasers_stack_on_fresh_clones(pack, mc, folders):
    model, clip = mc
    before = untouched(model, clip)
    d1, d2 = torch.full((320, 768), 0.002), torch.full((320, 768), -0.001)
    save_file({K_DIFFUSERS: base(model, K_COMFY) + d1}, str(folders / "one.safetensors"))
    save_file({K_DIFFUSERS: base(model, K_COMFY) + d2}, str(folders / "two.safetensors"))
    m1 = apply(pack, model, clip, "one.safetensors")[0]
    m2 = apply(pack, m1, clip, "two.safetensors", strength=2.0)[0]
    close(effective(m1, K_COMFY), base(model, K_COMFY) + d1)
    close(effective(m2, K_COMFY), base(model, K_COMFY) + d1 + 2.0 * d2)
    m3 = apply(pack, m1, clip, "two.safetensors", difference_from="model as it arrives")[0]
    close(effective(m3, K_COMFY), base(model, K_COMFY) + d2)  # exactly the file's weight
    assert untouched(model, clip) == before


def test_shapes_that_comfyui_would_skip_are_refused_and_nothing_changes(pack, mc, folders):
    """ComfyUI 0.3.64 only logs "SHAPE MISMATCH ... WEIGHT NOT MERGED" for a patch of another shape and
    samples the model un-erased: our patch files and ".diff" keys in LoRAs are checked before cloning."""
    model, clip = mc
    before = untouched(model, clip)
    meta = {"format": "concept_erasure.patchset", "format_version": "1", "meta": "{}"}
    save_file({K_COMFY + ".lora_up": torch.zeros(320, 4), K_COMFY + ".lora_down": torch.zeros(4, 1000)},
              str(folders / "patch.safetensors"), metadata=meta)
    err = pack.erasure_core.ErasureError
    with pytest.raises(err, match=r"input 'eraser': every patch entry must have the shape .*"
                                  r"to_k\.weight' is 320x1000 in the patch but 320x768 in the model") as caught:
        apply(pack, model, clip, "patch.safetensors")
    assert isinstance(caught.value, pack.erasure_core.PatchError)
    k_mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{k_mod}.diff": torch.zeros(320, 1000)}, str(folders / "diff.safetensors"))  # Save Erasure's layout
    with pytest.raises(err, match=r"input 'eraser': eraser file 'diff\.safetensors' must fit the connected model, but "
                                  r"its diff weight for .*to_k\.weight' has shape \(320, 1000\) while the model's "
                                  r"weight is \(320, 768\)"):
        apply(pack, model, clip, "diff.safetensors")
    save_file({f"{k_mod}.diff": torch.full((320, 768), 0.01)}, str(folders / "fits.safetensors"))
    m2 = apply(pack, model, clip, "fits.safetensors")[0]
    close(effective(m2, K_COMFY), base(model, K_COMFY) + 0.01)
    assert untouched(model, clip) == before


def test_pickled_code_is_refused_and_nothing_changes(pack, mc, folders):
    model, clip = mc
    before = untouched(model, clip)
    torch.save({K_DIFFUSERS: torch.zeros(320, 768), "payload": Payload()}, folders / "evil.pt")
    with pytest.raises(pack.erasure_core.ErasureError, match=r"weights_only=True.*never as a full pickle"):
        apply(pack, model, clip, "evil.pt")
    assert untouched(model, clip) == before
    with open(folders / "evil.pt", "rb") as f:  # the file really holds a pickle payload
        assert b"system" in f.read()


def test_extract_eraser_from_a_full_unet_and_apply_it(pack, mc, folders):
    from concept_erasure_pack.nodes.extract_eraser import ExtractEraser

    model, clip = mc
    before = untouched(model, clip)
    g = torch.Generator().manual_seed(7)
    low = torch.randn(320, 3, generator=g) @ torch.randn(3, 768, generator=g) * 0.01  # exactly rank 3
    full = {k: base(model, v) for k, v in diffusers_map(model).items()}
    full[K_DIFFUSERS] = full[K_DIFFUSERS] + low
    conv = "down_blocks.0.resnets.0.conv1.weight"
    conv_delta = torch.randn(full[conv].shape, generator=g) * 0.01
    full[conv] = full[conv] + conv_delta
    save_file({k: v.contiguous() for k, v in full.items()}, str(folders / "erased_unet.safetensors"))
    out = _run(ExtractEraser, model=model, erased_file="erased_unet.safetensors", max_rank=16, max_error=0.05,
               filename="small", concept_text="Van Gogh")
    m2, report = out.result
    saved = folders / "small.safetensors"
    assert saved.is_file() and saved.stat().st_size < (folders / "erased_unet.safetensors").stat().st_size / 20
    patch = pack.erasure_core.PatchSet.load(saved)
    assert patch[K_COMFY].rank == 3 and patch.meta["concept_text"] == "Van Gogh"
    assert patch.meta["fits"][K_COMFY][1] < 1e-4
    close(effective(m2, K_COMFY), base(model, K_COMFY) + low)
    conv_key = diffusers_map(model)[conv]
    err = (effective(m2, conv_key) - base(model, conv_key) - conv_delta).norm() / conv_delta.norm()
    assert err <= patch.meta["fits"][conv_key][1] + 1e-4
    assert "2 of" in report and "rank 3-16" in report
    m3, _, report3, _ = apply(pack, model, clip, "small.safetensors")
    close(effective(m3, K_COMFY), base(model, K_COMFY) + low)
    assert "concept-erasure patch" in report3
    assert untouched(model, clip) == before


def test_gate_leaves_an_unrelated_prompts_kv_unchanged(pack, mc, folders):
    model, clip = mc
    dk = torch.full((320, 768), 0.002)
    save_file({K_DIFFUSERS: base(model, K_COMFY) + dk}, str(folders / "gated.safetensors"),
              metadata={"concept_text": "Van Gogh"})
    # The tiny random CLIP gives unrelated prompts a flattened-sequence cosine of about 0.9 (the
    # padding rows dominate, as in real CLIP), so the threshold sits above it.
    gate = {"gate": "facilitated transport", "gate_threshold": 0.95, "facilitate_factor": 1.0}
    unrelated, _, report_u, _ = apply(pack, model, clip, "gated.safetensors", prompt="a bowl of ramen", **gate)
    related, _, report_r, _ = apply(pack, model, clip, "gated.safetensors", prompt="Van Gogh", **gate)
    torch.testing.assert_close(effective(unrelated, K_COMFY), base(model, K_COMFY), rtol=0, atol=0)
    close(effective(related, K_COMFY), base(model, K_COMFY) + dk)  # the prompt is the concept: gate 1
    assert unrelated is model and "gate 0.000" in report_u and "nothing (gate 0" in report_u
    assert "gate 1.000" in report_r and "vs 'Van Gogh'" in report_r
    half, _, report_h, _ = apply(pack, model, clip, "gated.safetensors", prompt="Van Gogh",
                                 **(gate | {"facilitate_factor": 0.5}))
    close(effective(half, K_COMFY), base(model, K_COMFY) + 0.5 * dk)


def test_whole_erased_checkpoint_patches_unet_and_clip(pack, mc, folders, tiny_state_dict):
    """RECE/ANT-style full CompVis checkpoint (fp16, UNet + CLIP + VAE): only what differs is patched."""
    model, clip = mc
    before = untouched(model, clip)
    sd = {k: v.clone() for k, v in tiny_state_dict.items()}
    unet_key, clip_key = "model." + K_COMFY, "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    sd[unet_key] = (sd[unet_key].float() + 0.01).half()
    sd[clip_key] = (sd[clip_key].float() - 0.02).half()
    save_file(sd, str(folders / "rece_full.safetensors"))
    m2, c2, report, _ = apply(pack, model, clip, "rece_full.safetensors")
    assert list(m2.patches) == [K_COMFY] and list(c2.patcher.patches) == [CLIP_FC1]
    expected = sd[unet_key].float()
    torch.testing.assert_close(effective(m2, K_COMFY), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(effective(c2.patcher, CLIP_FC1).float(), sd[clip_key].float(), rtol=0, atol=2e-3)
    assert "1 of" in report and "1 of 196 text-encoder weights differ" in report and "VAE" in report
    assert untouched(model, clip) == before


def test_extract_from_a_second_loaded_model(pack, mc, folders, tiny_state_dict):
    """Extract Eraser with the erased checkpoint loaded by ComfyUI's own loader as a second MODEL."""
    import comfy.sd
    from concept_erasure_pack.nodes.extract_eraser import ExtractEraser

    model, clip = mc
    g = torch.Generator().manual_seed(8)
    low = (torch.randn(320, 2, generator=g) @ torch.randn(2, 768, generator=g) * 0.01).half().float()
    sd = dict(tiny_state_dict)
    sd["model." + K_COMFY] = (sd["model." + K_COMFY].float() + low).half()
    expected = sd["model." + K_COMFY].float()
    erased = comfy.sd.load_state_dict_guess_config(sd)[0]  # consumes sd
    m2, report = _run(ExtractEraser, model=model, erased_file="none", max_rank=8, max_error=0.01,
                      filename="from_model.safetensors", erased_model=erased).result
    patch = pack.erasure_core.PatchSet.load(folders / "from_model.safetensors")
    assert list(patch.keys()) == [K_COMFY] and patch.meta["source"] == "erased_model"
    torch.testing.assert_close(effective(m2, K_COMFY), expected, rtol=0, atol=1e-3 * float(low.abs().max()))
    assert "1 of" in report
