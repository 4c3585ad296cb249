"""Tiny seeded DiTs and their text encoders, built at test time from ComfyUI's own classes.

Each diffusion model is built at a small width from ComfyUI's module (``comfy.ldm.flux.model.Flux``,
``OpenAISignatureMMDITWrapper``, ``QwenImageTransformer2DModel``, ``MMDiT``, ``PixArtMS``, ``WanModel``,
``LTXVModel``...), its state dict handed to ComfyUI's own
``model_detection.model_config_from_unet``, which must name the family's config class (``Flux``, ``SD3``,
``QwenImage``...). ComfyUI's detection hard-codes the full-size widths of most DiTs (Flux: hidden 3072,
T5 4096), so the detected config's widths are then set to the tiny ones before ComfyUI builds the model
from it (``get_model`` + ``load_model_weights``, as ``load_diffusion_model_state_dict`` does).

Text encoders are ComfyUI's own classes (``FluxClipModel``, ``SD3ClipModel``, ``QwenImageTEModel``, their
tokenizers with the tokenizer files ComfyUI ships: CLIP BPE, T5's ``tokenizer.json``, Qwen2.5's vocab and
merges) with small configs for the transformer inside (``SDClipModel`` takes a config dict). Their
constructors build full-size sub-models, so the tiny subclasses set the same attributes themselves.
Qwen2.5-VL's vision tower (not used for text) is left out. AuraFlow's Pile-T5 stays 2048 wide (ComfyUI
detects AuraFlow by that width) with ComfyUI's shipped ``t5_pile_tokenizer``; PixArt and LTX-Video use the
shipped T5 ``tokenizer.json``; WAN's UMT5 and Lumina's Gemma tokenizers live in the checkpoint, so a small
SentencePiece model is trained here. No file is downloaded.
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


def _t5_options(config: str = "t5_config_xxl.json", name: str = "t5xxl", end: int = 1, pad: int = 0,
                widths: dict | None = None, masked: bool = False, return_attention_masks: bool | None = None,
                zero_out_masked: bool = False) -> dict[str, Any]:
    """``SDClipModel`` arguments of a tiny T5 (Flux's, SD3's and Chroma's T5-XXL by default, padding
    read unmasked; ``masked``: padding masked out of attention, the mask returned unless told not to:
    HiDream's, LTX-Video's, AuraFlow's Pile-T5, WAN's UMT5)."""
    import comfy.text_encoders.t5

    return {"textmodel_json_config": _json(config, **(widths or T5)), "dtype": torch.float32,
            "special_tokens": {"end": end, "pad": pad}, "model_class": comfy.text_encoders.t5.T5,
            "enable_attention_masks": masked,
            "return_attention_masks": masked if return_attention_masks is None else return_attention_masks,
            "zero_out_masked": zero_out_masked, "model_options": {"model_name": name}}


def tiny_t5(*, device: str = "cpu", **options: Any):
    """A tiny T5 tower (options: :func:`_t5_options`)."""
    import comfy.sd1_clip

    return comfy.sd1_clip.SDClipModel(device=device, **_t5_options(**options))


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


def _tiny_llm(base: type, config: Any, **extra: Any) -> type:
    """ComfyUI's language model ``base`` (Llama, Qwen2.5-VL, Gemma 2) holding a tiny ``config``'s layers;
    ``extra`` attributes set on each instance (Qwen's absent vision tower)."""
    import comfy.text_encoders.llama as llama

    class Tiny(base):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype
            for name, value in extra.items():
                setattr(self, name, value)

    return Tiny


def qwen_clip(seed: int = SEED):
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qi

    config = llama.Qwen25_7BVLI_Config(vocab_size=152064, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config.head_dim, config.rope_dims = 8, [2, 1, 1]
    TinyQwen25 = _tiny_llm(llama.Qwen25_7BVLI, config, visual=None)  # the vision tower reads images only

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
            comfy.sd1_clip.SDClipModel.__init__(self, device=device, **_t5_options())

    class TinyChromaTE(pixart.PixArtT5XXL):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=torch.float32, name="t5xxl",
                                                 clip_model=TinyT5)

    return make_clip(TinyChromaTE, pixart.PixArtTokenizer, seed)


def gemma_tokenizer_model(**ids: int) -> bytes:
    """A small SentencePiece model trained here (Gemma's ids by default: pad 0, eos 1, bos 2, unk 3; ``ids``
    overrides them): ComfyUI reads Gemma's and UMT5's tokenizers from the text-encoder file, which a test
    cannot download."""
    import io

    import sentencepiece

    words = ("a photo of the cat dog red car van gogh painter monet zebra house tree in on with and "
             "painting by style portrait landscape city night blue green small large old new").split()
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(300)]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=50, model_type="unigram", hard_vocab_limit=False,
        minloglevel=2, **({"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3} | ids))
    return out.getvalue()


def lumina_clip(seed: int = SEED):
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.lumina2 as lumina

    config = llama.Gemma2_2B_Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2)
    config.head_dim = 8
    TinyGemma = _tiny_llm(llama.Gemma2_2B, config)

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


def build_dit(cls: type, widths: dict[str, Any], seed: int = SEED):
    """ComfyUI's DiT class ``cls`` at ``widths``, built on the meta device and loaded by :func:`load_dit`."""
    import comfy.ops

    with torch.device("meta"):
        module = cls(operations=comfy.ops.disable_weight_init, **widths)
    return load_dit(module, widths, seed)


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


def flux(seed: int = SEED, **overrides: Any):
    import comfy.ldm.flux.model

    widths = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
              "mlp_ratio": 2.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
              "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True} | overrides
    return build_dit(comfy.ldm.flux.model.Flux, widths, seed)


def sd3(seed: int = SEED):
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    widths = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 64,
              "pos_embed_max_size": 8, "num_patches": 64, "input_size": None,
              "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                                   "out_features": 128}}}
    return build_dit(mmdit.OpenAISignatureMMDITWrapper, widths, seed)


def qwen_image(seed: int = SEED):
    import comfy.ldm.qwen_image.model as qm

    widths = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}
    return build_dit(qm.QwenImageTransformer2DModel, widths, seed)


def chroma(seed: int = SEED):
    import comfy.ldm.chroma.model
    import comfy.ops

    widths = {"in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0,
              "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000,
              "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1}
    return build_dit(comfy.ldm.chroma.model.Chroma, widths, seed)


def lumina2(seed: int = SEED):
    import comfy.ldm.lumina.model
    import comfy.ops

    widths = {"patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 4,
              "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [4, 6, 6], "axes_lens": [300, 64, 64]}
    return build_dit(comfy.ldm.lumina.model.NextDiT, widths, seed)


LLAMA_WORDS = ("a photo of the cat dog red car van gogh painter monet zebra house tree in on with and painting by style "
               "portrait landscape city night blue green small large old new road street").split()


def llama_tokenizer_dir(folder: str) -> str:
    """A small Llama-3-style tokenizer (``tokenizer.json`` + config) written to ``folder``: ComfyUI reads
    Llama's from ``comfy/text_encoders/llama_tokenizer/tokenizer.json``, which its export here lacks (users
    have it). SentencePiece-style BPE (the layout transformers' LlamaTokenizer rebuilds): single characters
    plus merges to whole words, and Llama 3's special ids (``<|begin_of_text|>`` 128000, ``<|eot_id|>`` 128009,
    HiDream's padding)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "▁": 1}
    for c in sorted(set("abcdefghijklmnopqrstuvwxyz")):
        vocab[c] = len(vocab)
    merges = []
    for word in LLAMA_WORDS:
        piece = "▁"
        for c in word:
            merges.append((piece, c))
            piece += c
            vocab.setdefault(piece, len(vocab))
    specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009}
    tok = Tokenizer(models.BPE(vocab | specials, list(dict.fromkeys(merges)), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.add_special_tokens([AddedToken(name, special=True) for name in specials])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 128000)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|end_of_text|>", "tokenizer_class": "LlamaTokenizer", "legacy": True}, f)
    return folder


HIDREAM_LLAMA = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "num_key_value_heads": 2}
HIDREAM_LLAMA_LAYERS = [0, 2, 2]  # 3 per-layer states (ComfyUI drops the embeddings); layer 2 read twice


_TOKENIZER_DIR: Any = None  # one temporary folder per test process, removed at exit


def hidream_clip(seed: int = SEED):
    """ComfyUI's HiDream text encoder (CLIP-L + CLIP-G pooled, T5 rows, Llama's per-layer states) with tiny
    towers and ComfyUI's own tokenizers, its Llama tokenizer pointed at :func:`llama_tokenizer_dir` (in a
    temporary folder made once per process)."""
    import tempfile

    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.TemporaryDirectory(prefix="ce_llama_tokenizer_")
        llama_tokenizer_dir(_TOKENIZER_DIR.name)
    tokenizer_folder = _TOKENIZER_DIR.name
    import comfy.sd1_clip
    import comfy.text_encoders.hidream as hd
    import comfy.text_encoders.hunyuan_video as hv
    import comfy.text_encoders.llama as llama
    from transformers import LlamaTokenizerFast

    config = llama.Llama2Config(vocab_size=128256, **HIDREAM_LLAMA)
    config.head_dim = 12
    TinyLlama = _tiny_llm(llama.Llama2, config)

    class TinyLlamaModel(hv.LLAMAModel):
        def __init__(self):
            comfy.sd1_clip.SDClipModel.__init__(
                self, layer="all", layer_idx=None, textmodel_json_config={}, dtype=torch.float32,
                special_tokens={"start": 128000, "pad": 128009}, layer_norm_hidden_state=False, model_class=TinyLlama,
                enable_attention_masks=True, return_attention_masks=True, model_options={"model_name": "llama"})

    class TinyHiDreamTE(hd.HiDreamTEModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            self.clip_l = tiny_clip(return_projected_pooled=True)
            self.clip_g = tiny_clip(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                                    return_projected_pooled=True, num_layers=3)
            self.t5xxl = tiny_t5(masked=True)
            self.llama = TinyLlamaModel()
            self.dtypes = {torch.float32}

    class TinyLlamaTokenizer(hv.LLAMA3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None, min_length=128, pad_token=128009):
            comfy.sd1_clip.SDTokenizer.__init__(
                self, tokenizer_folder, embedding_directory=embedding_directory, pad_with_end=False, embedding_size=4096,
                embedding_key="llama", tokenizer_class=LlamaTokenizerFast, has_start_token=True, has_end_token=False,
                pad_to_max_length=False, max_length=99999999, pad_token=pad_token, min_length=min_length,
                tokenizer_data=tokenizer_data or {})

    class TinyHiDreamTokenizer(hd.HiDreamTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {})
            self.llama = TinyLlamaTokenizer(embedding_directory=embedding_directory)

    return make_clip(TinyHiDreamTE, TinyHiDreamTokenizer, seed)


def hidream(seed: int = SEED):
    """Tiny HiDream: 1 double + 2 single blocks, 4 caption projections (Llama layers 0, 2, 2; then T5 32
    wide), pooled CLIP-L ⊕ G 64 wide, 2 routed experts."""
    import comfy.ldm.hidream.model as hm

    widths = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1, "num_single_layers": 2,
              "attention_head_dim": 16, "num_attention_heads": 2, "caption_channels": [T5["d_model"], 48],
              "text_emb_dim": 2 * CLIP["projection_dim"], "num_routed_experts": 2, "num_activated_experts": 1,
              "axes_dims_rope": [8, 4, 4], "max_resolution": [16, 16], "llama_layers": HIDREAM_LLAMA_LAYERS}
    return build_dit(hm.HiDreamImageTransformer2DModel, widths, seed)


AURA_T5 = T5 | {"d_model": 2048}  # ComfyUI's AuraFlow config requires cond_seq_dim 2048 (Pile-T5-XL's width)


def aura_clip(seed: int = SEED):
    """AuraFlow's Pile-T5-XL (ComfyUI's ``AuraT5Model``: masked, masked rows zeroed) with its shipped
    SentencePiece ``t5_pile_tokenizer``, 2048 wide (the width ComfyUI detects AuraFlow by) but 2 layers
    of 4 heads × 8."""
    import comfy.sd1_clip
    import comfy.text_encoders.aura_t5 as aura

    def tiny_pile_t5(**kw):  # ComfyUI's PT5XlModel with a tiny config
        return tiny_t5(config="t5_pile_config_xl.json", name="pile_t5xl", end=2, pad=1, widths=AURA_T5, masked=True,
                               return_attention_masks=False, zero_out_masked=True)

    class TinyAuraTE(aura.AuraT5Model):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=torch.float32, name="pile_t5xl",
                                                 clip_model=tiny_pile_t5)

    return make_clip(TinyAuraTE, aura.AuraT5Tokenizer, seed)


def auraflow(seed: int = SEED):
    """Tiny AuraFlow: 1 double + 1 single layer, 64 wide (``cond_seq_linear`` 64×2048)."""
    import comfy.ldm.aura.mmdit as am

    widths = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2, "n_double_layers": 1,
              "n_heads": 4, "global_conddim": 64, "cond_seq_dim": AURA_T5["d_model"],
              "max_seq": 64}
    return build_dit(am.MMDiT, widths, seed)


def pixart_clip(seed: int = SEED):
    """PixArt's text encoder: ComfyUI's ``PixArtT5XXL`` (the one Chroma borrows), tiny."""
    return chroma_clip(seed)


def pixart(seed: int = SEED):
    """Tiny PixArt Sigma (no micro-conditioning, so ComfyUI names it ``PixArtSigma``): 1 block, 64 wide,
    captions 32 wide (``y_embedder.y_proj.fc1`` 64×32)."""
    import comfy.ldm.pixart.pixartms as pm
    import comfy.ops

    widths = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 1, "num_heads": 4,
              "caption_channels": T5["d_model"], "model_max_length": 300, "micro_condition": False,
              "image_model": "pixart_sigma"}
    module = pm.PixArtMS(operations=comfy.ops.disable_weight_init, **widths)  # not on meta: it calls .item()
    return load_dit(module, widths, seed)


def wan_clip(seed: int = SEED):
    """WAN 2.x's UMT5-XXL (ComfyUI's ``WanT5Model``: masked, masked rows zeroed), tiny, with a SentencePiece
    model trained here in UMT5's ids (pad 0, eos 1, unk 2, no bos): ComfyUI reads it from the checkpoint."""
    import comfy.sd1_clip
    import comfy.text_encoders.wan as wan

    def tiny_umt5(**kw):  # ComfyUI's UMT5XXlModel with a tiny config
        return tiny_t5(config="umt5_config_xxl.json", name="umt5xxl", widths=T5 | {"vocab_size": 256384}, masked=True,
                               return_attention_masks=False, zero_out_masked=True)

    class TinyWanTE(wan.WanT5Model):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kw):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=torch.float32, name="umt5xxl",
                                                 clip_model=tiny_umt5)

    spiece = gemma_tokenizer_model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    return make_clip(TinyWanTE, wan.WanT5Tokenizer, seed, {"spiece_model": torch.ByteTensor(list(spiece))})


def wan21(seed: int = SEED):
    """Tiny WAN 2.1 text-to-video: 1 block, 64 wide, 4 heads, text 32 wide (``text_embedding.0`` 64×32)."""
    import comfy.ldm.wan.model as wm

    widths = {"model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16, "dim": 64, "ffn_dim": 128,
              "freq_dim": 256, "text_dim": T5["d_model"], "out_dim": 16, "num_heads": 4, "num_layers": 1}
    return build_dit(wm.WanModel, widths, seed)


def ltxv_clip(seed: int = SEED):
    """LTX-Video's T5-XXL (ComfyUI's ``MochiT5XXL``: attention mask on, as ``ltxv_te`` builds it), tiny,
    with ComfyUI's ``LTXVT5Tokenizer`` (the shipped ``t5_tokenizer``)."""
    import comfy.sd1_clip
    import comfy.text_encoders.genmo as genmo
    import comfy.text_encoders.lt as lt

    class TinyLTXVTE(genmo.MochiT5XXL):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=torch.float32, name="t5xxl",
                                                 clip_model=lambda **kw: tiny_t5(masked=True))

    return make_clip(TinyLTXVTE, lt.LTXVT5Tokenizer, seed)


def ltxv(seed: int = SEED):
    """Tiny LTX-Video: 1 block, 4 heads × 16, captions 32 wide (``caption_projection.linear_1`` 64×32)."""
    import comfy.ldm.lightricks.model as lm

    widths = {"in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 16, "num_attention_heads": 4,
              "caption_channels": T5["d_model"], "num_layers": 1}
    return build_dit(lm.LTXVModel, widths, seed)
