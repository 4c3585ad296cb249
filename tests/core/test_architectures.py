from __future__ import annotations

import pytest

from erasure_core import ArchitectureError, detect, reference_site_shapes


@pytest.mark.parametrize(("name", "sites", "width"), [("sd1", 32, 768), ("sd2", 32, 1024), ("sdxl", 140, 2048)])
def test_full_size_layouts_are_recognised_with_their_sites(name, sites, width):
    shapes = reference_site_shapes(name)
    spec = detect(shapes)
    assert spec.name == name and spec.context_dim == width
    assert len(spec.site_keys(shapes)) == sites


def test_detection_ignores_the_key_prefix():
    shapes = reference_site_shapes("sd1", prefix="model.diffusion_model.")
    assert detect(shapes).name == "sd1"


@pytest.mark.parametrize(("keys", "name"), [
    ({"context_embedder.weight": (1536, 4096), "x_embedder.proj.weight": (1536, 16, 2, 2)}, "Stable Diffusion 3"),
    ({"txt_in.weight": (3072, 4096), "double_blocks.0.txt_attn.qkv.weight": (9216, 3072)}, "Flux"),
])
def test_dit_families_are_refused_as_not_supported_yet(keys, name):
    with pytest.raises(ArchitectureError, match=f"{name} models are not supported yet") as err:
        detect(keys)
    assert err.value.input_name == "model"


def test_unknown_models_list_what_was_tried():
    with pytest.raises(ArchitectureError, match=r"tried|sd1, sd2, sdxl"):
        detect({"encoder.layer.0.weight": (4, 4)})


def test_a_cross_attention_width_no_spec_knows_is_unknown():
    shapes = {"input_blocks.0.0.weight": (320, 4), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1280)}
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        detect(shapes)
