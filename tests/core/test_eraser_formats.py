"""Format detection from key names, shapes and metadata (no tensors are read), one case per
published format with keys exactly as the papers' code writes them (tiny SD1.5 shapes: widths
320/640, text width 768), plus the 'nothing matched' message and the family guesses."""

from __future__ import annotations

import pytest

from erasure_core import ErasureError
from erasure_core.formats.eraser_formats import EraserFormat, Naming, check_family, describe, key_patterns, model_family

K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def test_kohya_lora_spm_style():
    # kohya sd-scripts / SPM train_spm.py: lora_unet_<path>.lora_down.weight, .lora_up.weight, .alpha;
    # SPM metadata "prompts" holds the erased concept
    stem = "lora_unet_" + K.replace(".", "_")
    shapes = {f"{stem}.lora_down.weight": (1, 768), f"{stem}.lora_up.weight": (320, 1), f"{stem}.alpha": ()}
    info = describe(shapes, {"prompts": "snoopy", "rank": "1"})
    assert (info.format, info.family, info.rank, info.targets) == (EraserFormat.KOHYA_LORA, "SD1", 1, ("unet",))
    assert info.concept_text == "snoopy"


def test_kohya_lora_with_text_encoder_targets_both():
    shapes = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
              "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4),
              "lora_unet_" + K.replace(".", "_") + ".lora_down.weight": (4, 768),
              "lora_unet_" + K.replace(".", "_") + ".lora_up.weight": (320, 4)}
    assert describe(shapes).targets == ("unet", "text encoder")


def test_mace_attn_processor_lora():
    # MACE stage 2: unet.save_attn_procs -> <block>.attn2.processor.to_k_lora.down.weight (rank 1)
    stem = K.replace("attn2.to_k", "attn2.processor.to_k_lora")
    info = describe({f"{stem}.down.weight": (1, 768), f"{stem}.up.weight": (320, 1)})
    assert (info.format, info.family, info.rank) == (EraserFormat.DIFFUSERS_LORA, "SD1", 1)


def test_peft_lora_of_eraseanything_is_flux():
    # EraseAnything Flux-erase-dev/pytorch_lora_weights.safetensors (rank 8, add_k/add_q of 19 blocks)
    shapes = {}
    for n in range(19):
        for proj in ("add_k_proj", "add_q_proj"):
            shapes[f"transformer.transformer_blocks.{n}.attn.{proj}.lora_A.weight"] = (8, 3072)
            shapes[f"transformer.transformer_blocks.{n}.attn.{proj}.lora_B.weight"] = (3072, 8)
    info = describe(shapes)
    assert (info.format, info.family, info.rank) == (EraserFormat.DIFFUSERS_LORA, "Flux", 8)
    with pytest.raises(ErasureError, match="look like Flux"):
        check_family(info, "SD1")


def test_receler_flattened_dict_and_adapter_keys():
    # Receler eraser_weights.pt: {block: {down.weight, down.bias, up.weight, up.bias}}, rank 128
    shapes = {}
    for block, dim in (("down_blocks.0.attentions.0", 320), ("mid_block.attentions.0", 1280)):
        shapes |= {f"{block}.down.weight": (128, dim), f"{block}.down.bias": (128,),
                   f"{block}.up.weight": (dim, 128), f"{block}.up.bias": (dim,)}
    info = describe(shapes, config={"eraser_type": "adapter", "eraser_rank": 128})
    assert (info.format, info.rank, info.family) == (EraserFormat.RECELER, 128, "SD1/SD2")
    check_family(info, "SD2")  # SD1/SD2 are both accepted
    adapter_keys = {k.replace(".down.", ".adapter.down.").replace(".up.", ".adapter.up."): v for k, v in shapes.items()}
    assert describe(adapter_keys).format == EraserFormat.RECELER


def test_unet_weights_diffusers_and_ldm_names():
    # ESD esd_sd.py (esd-x): trained attn2 params, diffusers names
    info = describe({K + ".weight": (320, 768), K.replace("to_k", "to_out.0") + ".bias": (320,)})
    assert (info.format, info.naming, info.family) == (EraserFormat.UNET_WEIGHTS, Naming.DIFFUSERS, "SD1")
    # CompVis checkpoints: model.diffusion_model.*, with VAE/CLIP tensors beside them
    ldm = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
           "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}
    info = describe(ldm)
    assert (info.format, info.naming, info.family, info.keys) == (EraserFormat.UNET_WEIGHTS, Naming.LDM, "SD2", 1)
    assert "1 tensors outside the UNet" in info.notes[0]


def test_text_encoder_state_dict():
    # AdvUnlearn / few-shot erasing: HF CLIPTextModel (pytorch_model.bin)
    shapes = {"text_model.embeddings.token_embedding.weight": (49408, 768),
              "text_model.embeddings.position_ids": (1, 77),
              "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
              "text_model.final_layer_norm.weight": (768,)}
    info = describe(shapes)
    assert (info.format, info.family, info.targets) == (EraserFormat.TEXT_ENCODER, "SD1/SDXL", ("text encoder",))


def test_our_patch_file():
    shapes = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight.lora_up": (320, 3),
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight.lora_down": (3, 768)}
    info = describe(shapes, {"format": "concept_erasure.patchset", "meta": '{"concept_text": "Van Gogh"}'})
    assert (info.format, info.rank, info.family, info.concept_text) == (EraserFormat.PATCH, 3, "SD1", "Van Gogh")


def test_sdxl_widths_and_markers():
    assert describe({K + ".weight": (320, 2048)}).family == "SDXL"
    assert describe({"add_embedding.linear_1.weight": (1280, 2816)}).family == "SDXL"
    with pytest.raises(ErasureError, match="look like SDXL"):
        check_family(describe({K + ".weight": (320, 2048)}), "SD1")


def test_nothing_matched_lists_the_key_patterns():
    shapes = {f"vae.decoder.up.{i}.block.{j}.conv.weight": (4, 4) for i in range(3) for j in range(2)}
    shapes["something_else"] = (1,)
    with pytest.raises(ErasureError) as err:
        describe(shapes, name="eraser 'odd.safetensors'")
    text = str(err.value)
    assert "eraser 'odd.safetensors'" in text and "7 keys match none" in text
    assert "6x vae.decoder.up.…" in text and "1x something_else" in text


def test_empty_file_and_key_patterns():
    with pytest.raises(ErasureError, match="has none"):
        describe({})
    assert key_patterns(["a.1.b", "a.2.b", "c"]) == "2x a.N.b; 1x c"


def test_model_family_names():
    assert [model_family(n) for n in ("SD15", "SD20", "SDXL", "Flux", "SD3", "KOALA_700M")] == \
        ["SD1", "SD2", "SDXL", "Flux", "SD3", "SDXL"]


def test_whole_checkpoint_targets_unet_and_text_encoder():
    # RECE / ANT style full CompVis checkpoints: UNet, CLIP and VAE in one file
    shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
              "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}
    info = describe(shapes)
    assert info.targets == ("unet", "text encoder") and info.keys == 2 and "1 tensors outside" in info.notes[0]


def test_clip_l_text_encoder_fits_sd1_and_sdxl():
    info = describe({"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)})
    assert info.family == "SD1/SDXL"
    check_family(info, "SDXL")
    check_family(info, "SD1")
    with pytest.raises(ErasureError, match="look like SD1/SDXL"):
        check_family(info, "SD2")


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_a_full_flux_transformer_in_diffusers_names_is_transformer_weights(prefix):
    keys = {"transformer_blocks.0.attn.to_q.weight": (3072, 3072), "transformer_blocks.0.attn.add_k_proj.weight":
            (3072, 3072), "single_transformer_blocks.0.proj_mlp.weight": (12288, 3072),
            "context_embedder.weight": (3072, 4096), "x_embedder.weight": (3072, 64), "norm_out.linear.weight":
            (6144, 3072), "time_text_embed.text_embedder.linear_1.weight": (3072, 768)}
    info = describe({prefix + k: v for k, v in keys.items()})
    assert info.format == EraserFormat.UNET_WEIGHTS and info.naming == Naming.DIFFUSERS
    assert info.targets == ("transformer",) and info.family == "Flux" and info.keys == len(keys)


def test_a_sd15_unet_in_diffusers_names_is_still_a_unet():
    info = describe({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                     "conv_in.weight": (320, 4, 3, 3)})
    assert info.targets == ("unet",) and info.naming == Naming.DIFFUSERS


def test_refusals_blame_the_input_they_are_told():
    for call in (lambda **kw: describe({}, **kw), lambda **kw: describe({"vae.decoder.conv.weight": (2, 2)}, **kw),
                 lambda **kw: check_family(describe({K + ".weight": (320, 2048)}), "SD1", **kw)):
        with pytest.raises(ErasureError) as default:
            call()
        assert default.value.input_name == "eraser"
        with pytest.raises(ErasureError) as named:
            call(input_name="erased_file")
        assert named.value.input_name == "erased_file"
    with pytest.raises(ErasureError, match="or pick the erased_file released for SD1"):
        check_family(describe({K + ".weight": (320, 2048)}), "SD1", "erased_file 'x'", input_name="erased_file")


PATCH_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("shapes", [
    {PATCH_KEY + ".lora_up": (320,), PATCH_KEY + ".lora_down": (3, 768)},
    {PATCH_KEY + ".lora_up": (), PATCH_KEY + ".lora_down": (3, 768)},
    {PATCH_KEY + ".diff": (320, 768, 1)},
])
def test_a_patch_file_with_a_forged_header_is_refused_naming_the_key(shapes):
    # a 1-D lora_up used to raise IndexError at queue time: a generic error naming no input
    with pytest.raises(ErasureError, match=r"must hold 2-D matrices .* has shape") as caught:
        describe(shapes, {"format": "concept_erasure.patchset"}, name="eraser 'p.safetensors'")
    assert caught.value.input_name == "eraser" and "p.safetensors" in str(caught.value)


@pytest.mark.parametrize("shape", [(128,), (), (128, 320, 1)])
def test_a_receler_file_with_a_forged_header_is_refused_naming_the_key(shape):
    block = "down_blocks.0.attentions.0"
    shapes = {f"{block}.down.weight": shape, f"{block}.down.bias": (128,), f"{block}.up.weight": (320, 128),
              f"{block}.up.bias": (320,)}
    with pytest.raises(ErasureError, match=r"'down_blocks\.0\.attentions\.0\.down\.weight' has shape") as caught:
        describe(shapes, input_name="erased_file")
    assert caught.value.input_name == "erased_file"


@pytest.mark.parametrize("field", ["concept_text", "meta"])
def test_deeply_nested_or_huge_metadata_json_is_not_decoded(field):
    deep = "[" * 100_000 + "]" * 100_000  # json.loads raised RecursionError (not a ValueError)
    value = deep if field == "concept_text" else '{"concept_text": ' + deep + "}"
    info = describe({PATCH_KEY: (320, 768)}, {field: value})
    assert info.format == EraserFormat.UNET_WEIGHTS
    assert info.concept_text in ("", deep)
    huge = '["' + "a" * (1 << 20) + '"]'  # over the limit: skipped, not decoded
    assert describe({PATCH_KEY: (320, 768)}, {field: huge if field == "concept_text" else
                                              '{"concept_text": ' + huge + "}"}).concept_text == ""
    assert describe({PATCH_KEY: (320, 768)}, {"concept_text": '["snoopy", "van gogh"]'}).concept_text == \
        "snoopy; van gogh"
