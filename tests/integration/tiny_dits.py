"""Tiny seeded DiTs and their text encoders, built at test time from ComfyUI's own classes.

Each diffusion model is built at a small width from ComfyUI's module (``comfy.ldm.flux.model.Flux``,
``OpenAISignatureMMDITWrapper``, ``QwenImageTransformer2DModel``), its state dict handed to ComfyUI's own
``model_detection.model_config_from_unet``, which must name the family's config class (``Flux``, ``SD3``,
``QwenImage``...). ComfyUI's detection hard-codes the full-size widths of most DiTs (Flux: hidden 3072,
T5 4096), so the detected config's widths are then set to the tiny ones before ComfyUI builds the model
from it (``get_model`` + ``load_model_weights``, as ``load_diffusion_model_state_dict`` does).

Text encoders are ComfyUI's own classes (``FluxClipModel``, ``SD3ClipModel``, ``QwenImageTEModel``, their
tokenizers with the tokenizer files ComfyUI ships: CLIP BPE, T5's ``tokenizer.json``, Qwen2.5's vocab and
merges) with small configs for the transformer inside (``SDClipModel`` takes a config dict). Their
constructors build full-size sub-models, so the tiny subclasses set the same attributes themselves.
Qwen2.5-VL's vision tower (not used for text) is left out. No file is downloaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from tiny_sd15 import _fill

SEED = 0
T5 = {"d_ff": 64, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2, "vocab_size": 32128}
CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
        "projection_dim": 32}


def _json(name: str, **overrides: Any) -> dict[str, Any]:
    import comfy.sd1_clip

    base = os.path.dirname(comfy.sd1_clip.__file__)
    path = os.path.join(base, name) if os.path.exists(os.path.join(base, name)) else \
        os.path.join(base, "text_encoders", name)
    with open(path) as f:
        return json.load(f) | overrides


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    state = _fill(module, gen, torch.float32)
    module.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return module


def tiny_t5(**kw: Any):
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    return comfy.sd1_clip.SDClipModel(textmodel_json_config=_json("t5_config_xxl.json", **T5), dtype=torch.float32,
                                      special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                      enable_attention_masks=False, return_attention_masks=False,
                                      model_options={"model_name": "t5xxl"}, **kw)


def tiny_clip(num_layers: int = 2, **kw: Any):
    import comfy.sd1_clip

    config = _json("sd1_clip_config.json", **(CLIP | {"num_hidden_layers": num_layers}))
    return comfy.sd1_clip.SDClipModel(textmodel_json_config=config, dtype=torch.float32, **kw)


def make_clip(te_class: type, tokenizer_class: type, seed: int = SEED, tokenizer_data: dict | None = None):
    """A ComfyUI ``CLIP`` around ``te_class`` (built tiny) with ComfyUI's ``tokenizer_class``."""
    import comfy.sd

    class Target:
        params: dict[str, Any] = {}
        clip = te_class
        tokenizer = tokenizer_class

    clip = comfy.sd.CLIP(target=Target, model_options={"dtype": torch.float32}, tokenizer_data=tokenizer_data or {})
    _seeded(clip.cond_stage_model, seed)
    return clip


def flux_clip(seed: int = SEED):
    import comfy.text_encoders.flux

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            self.clip_l = tiny_clip(return_projected_pooled=False)
            self.t5xxl = tiny_t5()
            self.dtypes = {torch.float32}

    return make_clip(TinyFluxClip, comfy.text_encoders.flux.FluxTokenizer, seed)


def sd3_clip(seed: int = SEED):
    """SD3's CLIP-L + G without T5 (a configuration ComfyUI loads): ComfyUI pads the CLIP rows to
    4096 wide whatever the CLIP widths, so a tiny T5 could not be concatenated after them."""
    import comfy.text_encoders.sd3_clip as sd3

    class TinySD3Clip(sd3.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            self.clip_l = tiny_clip(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                                    return_projected_pooled=False, num_layers=3)
            self.clip_g = tiny_clip(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False, num_layers=3)
            self.t5xxl = None
            self.dtypes = {torch.float32}

    return make_clip(TinySD3Clip, sd3.SD3Tokenizer, seed)


def qwen_clip(seed: int = SEED):
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qi

    class TinyQwen25(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(vocab_size=152064, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
            config.head_dim, config.rope_dims = 8, [2, 1, 1]
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = None  # the vision tower reads images only
            self.dtype = dtype

    class TinyQwenModel(qi.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options=None):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=torch.float32,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask)

    class TinyQwenImageTE(qi.QwenImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=torch.float32, name="qwen25_7b",
                                                 clip_model=TinyQwenModel)

    return make_clip(TinyQwenImageTE, qi.QwenImageTokenizer, seed)


def chroma_clip(seed: int = SEED):
    """Chroma's text encoder: ComfyUI's PixArt T5-XXL wrapper (T5 alone, all-pad negative)."""
    import comfy.sd1_clip
    import comfy.text_encoders.pixart_t5 as pixart

    class TinyT5(pixart.T5XXLModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, textmodel_json_config=_json("t5_config_xxl.json", **T5), dtype=torch.float32,
                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=False, return_attention_masks=False, model_options={"model_name": "t5xxl"})

    class TinyChromaTE(pixart.PixArtT5XXL):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=torch.float32, name="t5xxl",
                                                 clip_model=TinyT5)

    import comfy.text_encoders.t5

    return make_clip(TinyChromaTE, pixart.PixArtTokenizer, seed)


def gemma_tokenizer_model() -> bytes:
    """A small SentencePiece model trained here (Gemma's ids: pad 0, eos 1, bos 2, unk 3): ComfyUI reads
    Gemma's tokenizer from the text-encoder file, which a test cannot download."""
    import io

    import sentencepiece

    words = ("a photo of the cat dog red car van gogh painter monet zebra house tree in on with and "
             "painting by style portrait landscape city night blue green small large old new").split()
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(300)]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=50, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    return out.getvalue()


def lumina_clip(seed: int = SEED):
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.lumina2 as lumina

    class TinyGemma(llama.Gemma2_2B):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Gemma2_2B_Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2)
            config.head_dim = 8
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyGemmaModel(lumina.Gemma2_2BModel):
        def __init__(self, device="cpu", layer="hidden", layer_idx=-2, dtype=None, attention_mask=True,
                     model_options=None):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=torch.float32,
                special_tokens={"start": 2, "pad": 0}, layer_norm_hidden_state=False, model_class=TinyGemma,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask)

    class TinyLuminaTE(lumina.LuminaModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            lumina.LuminaModel.__init__(self, device=device, dtype=torch.float32, clip_model=TinyGemmaModel)

    return make_clip(TinyLuminaTE, lumina.LuminaTokenizer, seed,
                     {"spiece_model": torch.ByteTensor(list(gemma_tokenizer_model()))})


def load_dit(module: torch.nn.Module, widths: dict[str, Any], seed: int = SEED):
    """(ModelPatcher, detected config class name): ``module``'s seeded weights detected by ComfyUI and
    built by it at the tiny ``widths``."""
    import comfy.model_detection
    import comfy.model_patcher

    sd = _fill(module, torch.Generator().manual_seed(seed), torch.float32)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert config is not None, "ComfyUI did not recognise the tiny model"
    config.unet_config.update(widths)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), type(config).__name__


def flux(seed: int = SEED):
    import comfy.ldm.flux.model
    import comfy.ops

    widths = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
              "mlp_ratio": 2.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
              "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    with torch.device("meta"):
        module = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **widths)
    return load_dit(module, widths, seed)


def sd3(seed: int = SEED):
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops

    widths = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 64,
              "pos_embed_max_size": 8, "num_patches": 64, "input_size": None,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                   "out_features": 128}}}
    with torch.device("meta"):
        module = mmdit.OpenAISignatureMMDITWrapper(operations=comfy.ops.disable_weight_init, **widths)
    return load_dit(module, widths, seed)


def qwen_image(seed: int = SEED):
    import comfy.ldm.qwen_image.model as qm
    import comfy.ops

    widths = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}
    with torch.device("meta"):
        module = qm.QwenImageTransformer2DModel(operations=comfy.ops.disable_weight_init, **widths)
    return load_dit(module, widths, seed)


def chroma(seed: int = SEED):
    import comfy.ldm.chroma.model
    import comfy.ops

    widths = {"in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0,
              "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000,
              "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1}
    with torch.device("meta"):
        module = comfy.ldm.chroma.model.Chroma(operations=comfy.ops.disable_weight_init, **widths)
    return load_dit(module, widths, seed)


def lumina2(seed: int = SEED):
    import comfy.ldm.lumina.model
    import comfy.ops

    widths = {"patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 4,
              "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [4, 6, 6], "axes_lens": [300, 64, 64]}
    with torch.device("meta"):
        module = comfy.ldm.lumina.model.NextDiT(operations=comfy.ops.disable_weight_init, **widths)
    return load_dit(module, widths, seed)
