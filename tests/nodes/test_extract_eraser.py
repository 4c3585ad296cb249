"""Extract Eraser's refusals of a bad erased_file (or erased_model): the shared eraser-file readers
are told which input the file came from, so each error is attributed to 'erased_file' and worded
with that name where it is raised; the same files in Apply Eraser LoRA still blame 'eraser'."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from comfy_stubs import PREFIX, FakePatcher, sd1_weights, site_key
from fakes import Payload
from safetensors.torch import save_file

K = site_key("input_blocks.1.1", "k")


class SD15:
    """Named like ComfyUI's SD1.5 model config, so the family check knows the model is SD1."""


class SD1Patcher(FakePatcher):
    @property
    def model(self):
        return SimpleNamespace(state_dict=lambda: self.weights, model_config=SD15())


# one broken or unsuitable file per check: name -> (what Extract Eraser's error says, Apply Eraser LoRA's)
BAD_FILES = {
    "evil.pt": ("erased_file 'evil.pt' must hold only tensors", "eraser file 'evil.pt' must hold only tensors"),
    "empty.pt": ("erased_file 'empty.pt' must contain weight tensors",
                 "eraser file 'empty.pt' must contain weight tensors"),
    "junk.safetensors": ("erased_file 'junk.safetensors' must be a readable safetensors file",
                         "eraser file 'junk.safetensors' must be a readable safetensors file"),
    "truncated.safetensors": ("erased_file 'truncated.safetensors' must be a readable safetensors file",
                              "eraser file 'truncated.safetensors' must be a readable safetensors file"),
    "odd.safetensors": ("erased_file 'odd.safetensors' must be an eraser in a known format",
                        "eraser 'odd.safetensors' must be an eraser in a known format"),
    "sdxl.safetensors": ("erased_file 'sdxl.safetensors' must be made for the connected SD1 model",
                         "eraser 'sdxl.safetensors' must be made for the connected SD1 model"),
    "unknown.safetensors": ("every UNet weight in the erased_file must exist in the connected SD1 model",
                            "every UNet weight in the eraser must exist in the connected SD1 model"),
    "narrow.safetensors": ("erased_file weights must have the connected model's shapes",
                           "eraser weights must have the connected model's shapes"),
    "nan.safetensors": ("erased_file 'nan.safetensors' must hold finite weights",
                        "eraser file 'nan.safetensors' must hold finite weights"),
}


@pytest.fixture
def bad_files(erasers):
    """Every file of :data:`BAD_FILES` written to the erasers folder; gives the model's weights."""
    folder, weights = erasers, sd1_weights()
    torch.save({"model." + K: weights[K], "x": Payload()}, folder / "evil.pt")
    torch.save({"epoch": 3}, folder / "empty.pt")
    (folder / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"model." + K: weights[K] + 0.01}, str(folder / "whole.safetensors"))
    whole = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) - 100])
    save_file({"vae.decoder.conv.weight": torch.zeros(2, 2)}, str(folder / "odd.safetensors"))
    sdxl_key = PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({sdxl_key: torch.zeros(8, 2048)}, str(folder / "sdxl.safetensors"))
    save_file({PREFIX + "input_blocks.9.9.weight": torch.zeros(2, 2)}, str(folder / "unknown.safetensors"))
    save_file({"model." + K: torch.zeros(4, 768)}, str(folder / "narrow.safetensors"))
    save_file({"model." + K: torch.full(weights[K].shape, float("nan"))}, str(folder / "nan.safetensors"))
    return weights


def _refusal(stub_env, call):
    with pytest.raises(stub_env.core.ErasureError) as caught:
        call()
    return caught.value, str(caught.value)


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_erased_file_is_blamed_on_erased_file(stub_env, erasers, bad_files, name):
    model = SD1Patcher(bad_files)
    node = stub_env.pack.nodes.extract_eraser.ExtractEraser
    err, text = _refusal(stub_env, lambda: node.execute(model=model, erased_file=name, max_rank=4, max_error=0.05,
                                                        filename="out"))
    assert err.input_name == "erased_file", (name, text)
    assert text.startswith("Extract Eraser, input 'erased_file': ") and BAD_FILES[name][0] in text, (name, text)
    assert "eraser file" not in text and "input 'eraser'" not in text, (name, text)
    assert not (erasers / "out.safetensors").exists() and model.patches == {}


@pytest.mark.parametrize("name", BAD_FILES)
def test_the_same_files_in_apply_eraser_still_blame_eraser(stub_env, bad_files, name):
    node = stub_env.pack.nodes.apply_eraser.ApplyEraserLoRA
    err, text = _refusal(stub_env, lambda: node.execute(model=SD1Patcher(bad_files), clip=None, eraser=name,
                                                        strength=1.0))
    assert err.input_name == "eraser" and text.startswith("Apply Eraser LoRA, input 'eraser': "), (name, text)
    assert "erased_file" not in text and BAD_FILES[name][1] in text, (name, text)


def test_a_mismatched_erased_model_is_blamed_on_erased_model(stub_env, erasers):
    weights = sd1_weights()
    erased = FakePatcher({k: (torch.zeros(4, 768) if k == K else v.clone()) for k, v in weights.items()})
    node = stub_env.pack.nodes.extract_eraser.ExtractEraser
    with pytest.raises(stub_env.core.ErasureError) as caught:
        node.execute(model=FakePatcher(weights), erased_file="none", max_rank=4, max_error=0.05, filename="out",
                     erased_model=erased)
    text = str(caught.value)
    assert caught.value.input_name == "erased_model" and "erased_model weights must have" in text, text
    assert "eraser" not in text.replace("Extract Eraser", ""), text
