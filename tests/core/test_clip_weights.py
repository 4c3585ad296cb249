"""A checkpoint's CLIP loaded into the core's encoder gives the same hidden states as the reference
implementation (transformers' CLIPTextModel), in both checkpoint layouts (HF names for CLIP-L,
OpenCLIP names for ViT-H/bigG), for the layer each architecture reads."""

from __future__ import annotations

import pytest
import torch

from erasure_core import ArchitectureError
from erasure_core.text.clip_weights import TEXT_ENCODERS, ClipLayout, ConcatEncoder, load_text_encoder

transformers = pytest.importorskip("transformers", reason="transformers is the reference CLIP implementation")


def _reference(act: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=512,
                                         num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                                         hidden_act=act, eos_token_id=49407, bos_token_id=49406, pad_token_id=1)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # LayerNorm scales away from 1: a wrong norm shows
    return model


def _hf_names(model) -> dict[str, torch.Tensor]:
    """The checkpoint's names: transformers 5 drops the ``text_model.`` level from its state dict."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in model.state_dict().items()}


def _openclip_names(hf: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {prefix + "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": hf["text_model.final_layer_norm.bias"],
           prefix + "text_projection": torch.randn(128, 128)}
    for i in range(3):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([hf[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind}"] = hf[src + f"{a}.{kind}"]
    return out


def _ids(tokenizer, texts, pad):
    ids, _ = tokenizer(texts)
    if pad is not None:
        ids = torch.where(torch.arange(77) > _[:, None], torch.full_like(ids, pad), ids)
    return ids


@pytest.mark.parametrize("style,layer,act,pad", [("hf", "last", "quick_gelu", None),
                                                 ("hf", "penultimate", "quick_gelu", None),
                                                 ("openclip", "penultimate", "gelu", 0)])
def test_loaded_encoder_matches_transformers(clip_tokenizer, style, layer, act, pad):
    ref = _reference(act)
    prefix = "te." if style == "hf" else "clip_g."
    sd = {prefix + k: v for k, v in _hf_names(ref).items()} if style == "hf" else \
        _openclip_names(_hf_names(ref), prefix)
    layout = ClipLayout((prefix + ("text_model." if style == "hf" else ""),), style, layer, act, pad)
    enc = load_text_encoder(list(sd), sd.__getitem__, layout, clip_tokenizer)
    texts = ["a painting by Van Gogh", "a photo of a cat sitting on a mat", ""]
    with torch.no_grad():
        out = ref(input_ids=_ids(clip_tokenizer, texts, pad), output_hidden_states=True)
    want = out.last_hidden_state if layer == "last" else out.hidden_states[-2]
    got = enc(texts).hidden
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert enc.tokenizer.pad_id == (clip_tokenizer.end_id if pad is None else pad)


def test_sdxl_context_is_both_penultimate_layers_side_by_side(clip_tokenizer):
    a, b = _reference("quick_gelu", 1), _reference("gelu", 2)
    sd = {"conditioner.embedders.0.transformer." + k: v for k, v in _hf_names(a).items()}
    sd |= _openclip_names(_hf_names(b), "conditioner.embedders.1.model.")
    encoders = [load_text_encoder(list(sd), sd.__getitem__, lay, clip_tokenizer) for lay in TEXT_ENCODERS["sdxl"]]
    enc = ConcatEncoder(encoders)(["Van Gogh"])
    assert enc.hidden.shape == (1, 77, 256)
    torch.testing.assert_close(enc.hidden[..., :128], encoders[0](["Van Gogh"]).hidden)


def test_a_checkpoint_without_text_encoder_is_refused(clip_tokenizer):
    with pytest.raises(ArchitectureError, match="text encoder"):
        load_text_encoder(["model.diffusion_model.x"], lambda k: torch.zeros(1), TEXT_ENCODERS["sd1"][0],
                          clip_tokenizer)

