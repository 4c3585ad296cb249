"""Apply Eraser LoRA on DiTs in a real ComfyUI (in-process, --cpu): LoRAs for the tiny Flux, SD3 and
Qwen-Image models in the namings ComfyUI's LoRA loader knows (EraseAnything's PEFT/diffusers names
included), gated or not, and full erased transformer files differenced like UNet ones."""

from __future__ import annotations

import pytest
import tiny_dits
import torch
from safetensors.torch import save_file
from sampling import live_weight

pytestmark = pytest.mark.comfyui
P = "diffusion_model."
H = {"flux": 64, "sd3": 128, "qwen_image": 32}  # the tiny models' hidden widths


@pytest.fixture(scope="module")
def models(pack):
    return {"flux": tiny_dits.flux()[0], "sd3": tiny_dits.sd3()[0], "qwen_image": tiny_dits.qwen_image()[0]}


@pytest.fixture(scope="module")
def flux_clip(pack):
    return tiny_dits.flux_clip()


def _apply(model, clip, eraser, **options):
    from concept_erasure_pack.nodes.apply_eraser import ApplyEraserLoRA

    with torch.inference_mode():
        return ApplyEraserLoRA.execute(model=model, clip=clip, eraser=eraser, strength=1.0, **options).result


# (family, LoRA module name in the file, ComfyUI weight, rows of it the module is): ComfyUI's own maps
CASES = {
    "flux PEFT (EraseAnything)": ("flux", "transformer.transformer_blocks.0.attn.add_k_proj",
                                  "double_blocks.0.txt_attn.qkv.weight", (64, 128)),
    "flux kohya": ("flux", "lora_unet_double_blocks_0_txt_attn_qkv", "double_blocks.0.txt_attn.qkv.weight",
                   (0, 192)),
    "flux OneTrainer": ("flux", "lora_transformer_transformer_blocks_0_attn_add_q_proj",
                        "double_blocks.0.txt_attn.qkv.weight", (0, 64)),
    "sd3 diffusers": ("sd3", "transformer.transformer_blocks.0.attn.add_k_proj",
                      "joint_blocks.0.context_block.attn.qkv.weight", (128, 256)),
    "qwen_image diffusers": ("qwen_image", "transformer.transformer_blocks.0.attn.add_k_proj",
                             "transformer_blocks.0.attn.add_k_proj.weight", (0, 32)),
}
SUFFIXES = {"PEFT": (".lora_A.weight", ".lora_B.weight"), "kohya": (".lora_down.weight", ".lora_up.weight")}


def _write_lora(path, module, rows, width, rank=2, seed=0, peft=True):
    g = torch.Generator().manual_seed(seed)
    down, up = SUFFIXES["PEFT" if peft else "kohya"]
    a = torch.randn(rank, width, generator=g) * 0.1
    b = torch.randn(rows[1] - rows[0], rank, generator=g) * 0.1
    save_file({module + down: a, module + up: b}, str(path), metadata={"concept_text": "cat"})
    return b @ a


@pytest.mark.parametrize("case", list(CASES))
def test_a_dit_lora_in_comfyuis_namings_lands_on_the_weight_it_names(models, folders, case):
    family, module, key, rows = CASES[case]
    model = models[family]
    delta = _write_lora(folders / "eraser.safetensors", module, rows, H[family], peft="kohya" not in case)
    before = live_weight(model, P + key)
    patched, _, report = _apply(model, None, "eraser.safetensors")
    after = live_weight(patched, P + key)
    expected = before.clone()
    expected[rows[0]:rows[1]] += delta
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)
    assert "LoRA" in report and not model.patches
    live_weight(model, P + key)


def test_a_gated_flux_lora_acts_on_its_concept_and_not_on_an_unrelated_prompt(models, flux_clip, folders):
    family, module, key, rows = CASES["flux PEFT (EraseAnything)"]
    model = models[family]
    _write_lora(folders / "eraser.safetensors", module, rows, H[family])
    gated = {"gate": "facilitated transport", "concept_text": "cat", "gate_threshold": 0.9}
    on, _, on_report = _apply(model, flux_clip, "eraser.safetensors", prompt="cat", **gated)
    off, _, off_report = _apply(model, flux_clip, "eraser.safetensors", prompt="a red car on a road", **gated)
    assert on.patches and "gate 1.000" in on_report
    assert off is model and "gate 0" in off_report


def test_a_full_erased_flux_transformer_is_differenced_like_a_unet(models, folders):
    """A whole erased transformer (ComfyUI names, as saved by ComfyUI's model save): only the weights
    that differ are patched, as W_file − W_model."""
    model = models["flux"]
    state = {P + k: v.float().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    change = torch.randn(state[P + "txt_in.weight"].shape, generator=g) * 0.01
    state[P + "txt_in.weight"] += change
    save_file({"model." + k: v.contiguous() for k, v in state.items()}, str(folders / "erased_flux.safetensors"))
    before = live_weight(model, P + "txt_in.weight")
    patched, _, report = _apply(model, None, "erased_flux.safetensors")
    assert "1 of" in report and set(patched.patches) == {P + "txt_in.weight"}
    torch.testing.assert_close(live_weight(patched, P + "txt_in.weight"), before + change, rtol=0, atol=1e-6)
    live_weight(model, P + "txt_in.weight")


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image"])
@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_lora_module_names_round_trip_through_comfyuis_loader(models, folders, family, naming):
    from concept_erasure_pack.nodes import _comfy

    model = models[family]
    names = _comfy.lora_module_names(model, naming)
    key = next(k for k in names if k.endswith(("txt_in.weight", "context_embedder.weight")))
    rows = tuple(model.model_state_dict()[key].shape)
    delta = _write_lora(folders / "named.safetensors", names[key], (0, rows[0]), rows[1],
                        peft=naming == "diffusers")
    before = live_weight(model, key)
    patched, _, _ = _apply(model, None, "named.safetensors")
    torch.testing.assert_close(live_weight(patched, key), before + delta, rtol=0, atol=1e-5)
    live_weight(model, key)


def _flux_diffusers_state(model, prefix=""):
    """The tiny Flux's transformer as diffusers saves it (``transformer_blocks.N.attn.to_q``... split out of
    ComfyUI's fused ``qkv``, ``norm_out.linear`` with scale and shift swapped), built from ComfyUI's map."""
    import comfy.utils

    state = {P + k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    out = {}
    for name, target in comfy.utils.flux_to_diffusers(model.model.model_config.unet_config, output_prefix=P).items():
        if isinstance(target, str):
            if target in state:
                out[prefix + name] = state[target].clone()
            continue
        if target[0] not in state:
            continue
        weight = state[target[0]]
        if target[1] is not None:
            weight = weight.narrow(*target[1])
        out[prefix + name] = (target[2](weight) if len(target) > 2 else weight).clone().contiguous()
    return out


@pytest.fixture(scope="module")
def flux4(pack):
    """Flux's own MLP ratio 4: diffusers' ``proj_mlp`` is rows 3H..7H of ComfyUI's ``linear1`` (ComfyUI's map
    and loader assume it, as every Flux has it)."""
    return tiny_dits.flux(mlp_ratio=4.0)[0]


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_a_full_erased_flux_transformer_in_diffusers_names_is_differenced(flux4, folders, prefix):
    """Every tensor of the file is a block of one ComfyUI weight: only the two weights whose blocks changed
    (the K rows of the text stream's fused qkv, and txt_in) are patched, each by exactly its change; every
    other block, the swapped final modulation included, lands on its own weight unchanged."""
    model = flux4
    state = _flux_diffusers_state(model, prefix)
    assert len(state) > 30 and prefix + "transformer_blocks.0.attn.add_k_proj.weight" in state
    g = torch.Generator().manual_seed(5)
    k_change = torch.randn(state[prefix + "transformer_blocks.0.attn.add_k_proj.weight"].shape, generator=g) * 0.01
    txt_change = torch.randn(state[prefix + "context_embedder.weight"].shape, generator=g) * 0.01
    state[prefix + "transformer_blocks.0.attn.add_k_proj.weight"] += k_change
    state[prefix + "context_embedder.weight"] += txt_change
    save_file(state, str(folders / "erased_flux_diffusers.safetensors"))
    qkv, txt_in = P + "double_blocks.0.txt_attn.qkv.weight", P + "txt_in.weight"
    before_qkv, before_txt = live_weight(model, qkv), live_weight(model, txt_in)
    patched, _, report = _apply(model, None, "erased_flux_diffusers.safetensors")
    assert "2 of" in report and set(patched.patches) == {qkv, txt_in}, report
    expected = before_qkv.clone()
    expected[H["flux"]:2 * H["flux"]] += k_change  # add_k_proj: rows H..2H of the fused qkv
    torch.testing.assert_close(live_weight(patched, qkv), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(live_weight(patched, txt_in), before_txt + txt_change, rtol=0, atol=1e-6)
    assert not model.patches
    live_weight(model, qkv)


def test_a_diffusers_transformer_file_for_another_model_is_refused_by_name(models, flux4, folders):
    from concept_erasure_pack.erasure_core import ErasureError

    state = _flux_diffusers_state(flux4)
    save_file(state, str(folders / "flux_diffusers.safetensors"))
    with pytest.raises(ErasureError, match="mapped onto Flux models only, but the connected model is"):
        _apply(models["qwen_image"], None, "flux_diffusers.safetensors")
    state["transformer_blocks.7.attn.to_q.weight"] = torch.zeros(64, 64)
    save_file(state, str(folders / "flux_diffusers_deeper.safetensors"))
    with pytest.raises(ErasureError, match="transformer_blocks.7.attn.to_q.weight"):
        _apply(flux4, None, "flux_diffusers_deeper.safetensors")
