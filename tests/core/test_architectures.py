from __future__ import annotations

import pytest
import torch

from erasure_core import ArchitectureError, RowTransform, detect, reference_site_shapes
from erasure_core.architectures import layer_stream, parse_layer_stream


@pytest.mark.parametrize(("name", "sites", "width"), [("sd1", 32, 768), ("sd2", 32, 1024), ("sdxl", 140, 2048)])
def test_full_size_layouts_are_recognised_with_their_sites(name, sites, width):
    shapes = reference_site_shapes(name)
    spec = detect(shapes)
    assert spec.name == name and spec.context_dim == width
    assert len(spec.site_keys(shapes)) == sites


def test_detection_ignores_the_key_prefix():
    shapes = reference_site_shapes("sd1", prefix="model.diffusion_model.")
    assert detect(shapes).name == "sd1"


FLUX_BLOCK = "double_blocks.0.img_attn.norm.key_norm.scale"


@pytest.mark.parametrize(("keys", "name", "sites"), [
    ({"context_embedder.weight": (1536, 4096), "x_embedder.proj.weight": (1536, 16, 2, 2),
      "joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536), "y_embedder.mlp.0.weight": (1536, 2048)},
     "sd3", {"context_embedder.weight": "tokens", "y_embedder.mlp.0.weight": "pooled"}),
    ({"txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768), "img_in.weight": (3072, 64),
      FLUX_BLOCK: (128,)}, "flux", {"txt_in.weight": "tokens", "vector_in.in_layer.weight": "pooled"}),
    ({"txt_in.weight": (3072, 4096), "img_in.weight": (3072, 64), FLUX_BLOCK: (128,),
      "distilled_guidance_layer.in_proj.weight": (5120, 64)}, "chroma", {"txt_in.weight": "tokens"}),
    ({"txt_in.weight": (3072, 4096), FLUX_BLOCK: (128,), "nerf_blocks.0.norm.scale": (64,),
      "distilled_guidance_layer.in_proj.weight": (5120, 64)}, "chroma_radiance", {"txt_in.weight": "tokens"}),
    ({"txt_in.weight": (3072, 3584), "txt_norm.weight": (3584,), "img_in.weight": (3072, 64)},
     "qwen_image", {"txt_in.weight": "tokens"}),
    ({"cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304)}, "lumina2",
     {"cap_embedder.1.weight": "tokens"}),
    ({"cond_seq_linear.weight": (3072, 2048)}, "auraflow", {"cond_seq_linear.weight": "tokens"}),
    ({"y_embedder.y_proj.fc1.weight": (1152, 4096), "t_block.1.weight": (6912, 1152)}, "pixart",
     {"y_embedder.y_proj.fc1.weight": "tokens"}),
    ({"caption_projection.linear_1.weight": (2048, 4096), "adaln_single.emb.timestep_embedder.linear_1.bias": (2048,),
      "transformer_blocks.0.attn2.to_k.weight": (2048, 2048)}, "ltxv", {"caption_projection.linear_1.weight": "tokens"}),
    ({"head.modulation": (1, 2, 1536), "text_embedding.0.weight": (1536, 4096)}, "wan",
     {"text_embedding.0.weight": "tokens"}),
])
def test_dit_families_are_rows_with_their_text_inputs(keys, name, sites):
    shapes = {"diffusion_model." + k: v for k, v in keys.items()}
    spec = detect(shapes)
    assert spec.name == name and spec.supported
    found = {k.removeprefix("diffusion_model."): inp.stream for k, inp in spec.site_inputs(shapes)}
    assert found == sites


def test_row_norms_name_the_layer_in_front_of_the_projection():
    shapes = {"diffusion_model.txt_in.weight": (64, 32), "diffusion_model.txt_norm.weight": (32,),
              "diffusion_model.img_in.weight": (64, 64)}
    spec = detect(shapes)
    (key, inp), = spec.site_inputs(shapes)
    assert inp.norm is not None and spec.norm_key(shapes, inp.norm) == "diffusion_model.txt_norm.weight"


def test_row_transform_is_comfyuis_rms_norm():
    g = torch.rand(8) + 0.5
    x = torch.randn(3, 5, 8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    torch.testing.assert_close(RowTransform("n", 1e-6, g)(x), expected)
    assert torch.equal(RowTransform("n", 1e-6, g)(torch.zeros(2, 8)), torch.zeros(2, 8))


@pytest.mark.parametrize(("keys", "name"), [
    ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": (3072,), "txt_in.input_embedder.weight": (3072, 4096)},
     "HunyuanVideo"),
])
def test_refused_families_are_named_with_the_reason_and_what_is_supported(keys, name):
    with pytest.raises(ArchitectureError, match=f"{name} models are not supported: its ") as err:
        detect(keys)
    assert err.value.input_name == "model" and "Flux" in str(err.value) and "Qwen-Image" in str(err.value)


@pytest.mark.parametrize(("name", "widths"), [("flux", {4096, 768}), ("sd35_large", {4096, 2048}),
                                               ("qwen_image", {3584})])
def test_full_size_dit_layouts_are_recognised(name, widths):
    shapes = reference_site_shapes(name)
    spec = detect(shapes)
    assert spec.name == name.split("_large")[0].replace("sd35", "sd3")
    assert {shapes[k][1] for k in spec.site_keys(shapes)} == widths


def test_unknown_models_list_what_was_tried():
    with pytest.raises(ArchitectureError, match=r"tried|sd1, sd2, sdxl"):
        detect({"encoder.layer.0.weight": (4, 4)})


def test_a_cross_attention_width_no_spec_knows_is_unknown():
    shapes = {"input_blocks.0.0.weight": (320, 4), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1280)}
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        detect(shapes)


HIDREAM = {**{f"caption_projection.{i}.linear.weight": (2560, 4096) for i in range(5)},
           "p_embedder.pooled_embedder.linear_1.weight": (2560, 2048)}


def test_hidream_projections_read_their_llama_layer_and_the_last_reads_t5():
    shapes = {"diffusion_model." + k: v for k, v in HIDREAM.items()}
    spec = detect(shapes)
    assert spec.name == "hidream" and spec.supported
    found = {k.removeprefix("diffusion_model."): s for k, _, s in spec.site_streams(shapes, {"llama_layers": [0, 3, 3, 7]})}
    assert found == {"caption_projection.0.linear.weight": "llama:0", "caption_projection.1.linear.weight": "llama:3",
                     "caption_projection.2.linear.weight": "llama:3", "caption_projection.3.linear.weight": "llama:7",
                     "caption_projection.4.linear.weight": "tokens",
                     "p_embedder.pooled_embedder.linear_1.weight": "pooled"}


def test_a_hidream_projection_past_the_layer_table_is_read_by_nothing_and_the_table_is_required():
    shapes = dict(HIDREAM)
    found = {k: s for k, _, s in detect(shapes).site_streams(shapes, {"llama_layers": [5, 6]})}
    assert "caption_projection.2.linear.weight" not in found and "caption_projection.3.linear.weight" not in found
    assert found["caption_projection.1.linear.weight"] == "llama:6" and found["caption_projection.4.linear.weight"] == "tokens"
    with pytest.raises(ArchitectureError, match="llama_layers") as err:
        detect(shapes).site_streams(shapes, {})
    assert err.value.input_name == "model"


def test_indexed_keys_match_whole_indices_only():
    spec = detect(dict(HIDREAM))
    keys = [k for k, _ in spec.site_inputs({**HIDREAM, "caption_projection.linear_1.weight": (1, 1),
                                            "x.caption_projection.12.linear.weight": (1, 1)})]
    assert "caption_projection.linear_1.weight" not in keys and "x.caption_projection.12.linear.weight" in keys


def test_layer_stream_names_round_trip():
    assert parse_layer_stream(layer_stream("llama", 31)) == ("llama", 31)
    assert parse_layer_stream("tokens") is None and parse_layer_stream("pooled") is None
