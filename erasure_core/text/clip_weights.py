"""A checkpoint's own text encoder(s) as :class:`ClipTextEncoder` s (the CLI's ``erase``).

Single-file checkpoints hold CLIP in one of two layouts: HF ``CLIPTextModel`` names
(``…text_model.encoder.layers.N.self_attn.q_proj``; OpenAI CLIP-L in SD1.x and SDXL) or OpenCLIP
names (``…transformer.resblocks.N.attn.in_proj_weight``; ViT-H in SD2.x, ViT-bigG in SDXL).
``TEXT_ENCODERS`` lists, per architecture, where each encoder lives and how ComfyUI reads it
(output layer, activation, padding token), so the CLI encodes concepts as a ComfyUI graph on the
same checkpoint does; SDXL's context is the two penultimate layers side by side (768 + 1280).
Width, depth and heads (width / 64) come from the weights' shapes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ArchitectureError
from .clip import BPETokenizer, ClipTextConfig, ClipTextEncoder
from .encoded import EncodedText

__all__ = ["TEXT_ENCODERS", "ClipLayout", "ConcatEncoder", "load_text_encoder"]

Reader = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class ClipLayout:
    """One text encoder in a checkpoint: key ``prefixes`` (first present wins), ``style`` (``hf`` or
    ``openclip``), the layer read (``last``: normed last layer; ``penultimate``: the hidden state
    before the last block, not normed), the MLP activation and the id padded after the end token
    (None: the end token)."""

    prefixes: tuple[str, ...]
    style: str
    layer: str
    activation: str
    pad_id: int | None = None


TEXT_ENCODERS: dict[str, tuple[ClipLayout, ...]] = {
    "sd1": (ClipLayout(("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."), "hf", "last",
                       "quick_gelu"),),
    "sd2": (ClipLayout(("cond_stage_model.model.",), "openclip", "penultimate", "gelu", 0),),
    "sdxl": (ClipLayout(("conditioner.embedders.0.transformer.text_model.",), "hf", "penultimate", "quick_gelu"),
             ClipLayout(("conditioner.embedders.1.model.",), "openclip", "penultimate", "gelu", 0)),
}

_HF = {"embeddings.token_embedding.weight": "token_embedding.weight",
       "embeddings.position_embedding.weight": "position_embedding",
       "final_layer_norm.weight": "final_ln.weight", "final_layer_norm.bias": "final_ln.bias"}
_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_OPENCLIP = {"token_embedding.weight": "token_embedding.weight", "positional_embedding": "position_embedding",
             "ln_final.weight": "final_ln.weight", "ln_final.bias": "final_ln.bias"}
_OPENCLIP_BLOCK = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.out_proj": "attn.out_proj", "mlp.c_fc": "fc1",
                   "mlp.c_proj": "fc2", "attn.in_proj_weight": "attn.in_proj_weight",
                   "attn.in_proj_bias": "attn.in_proj_bias"}


def _state_dict(keys: Sequence[str], read: Reader, prefix: str, style: str, layers: int) -> dict[str, torch.Tensor]:
    """Our module's state dict (first ``layers`` blocks) from the checkpoint's keys under ``prefix``."""
    top, per_block = (_HF, _HF_BLOCK) if style == "hf" else (_OPENCLIP, _OPENCLIP_BLOCK)
    block_re = re.compile(r"^(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in top:
            out[top[name]] = read(key).float()
            continue
        m = block_re.match(name)
        if m is None or int(m.group(1)) >= layers:
            continue
        i, rest = int(m.group(1)), m.group(2)
        qm = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if qm:  # HF splits the attention input projection; ours (as OpenCLIP's) is one [3D, D] matrix
            qkv.setdefault(i, {})[f"{qm.group(1)}.{qm.group(2)}"] = read(key).float()
            continue
        module, _, param = rest.rpartition(".") if not rest.startswith("attn.in_proj") else (rest, "", "")
        if module in per_block:
            target = per_block[module]
            out[f"blocks.{i}.{target}" + (f".{param}" if param else "")] = read(key).float()
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[f"{p}.{kind}"] for p in "qkv"])
    if "final_ln.weight" not in out:  # unused when the penultimate layer is read; the module still has one
        width = out["token_embedding.weight"].shape[1]
        out["final_ln.weight"], out["final_ln.bias"] = torch.ones(width), torch.zeros(width)
    return out


def load_text_encoder(keys: Sequence[str], read: Reader, layout: ClipLayout, tokenizer: BPETokenizer,
                      *, name: str = "the checkpoint") -> ClipTextEncoder:
    """The encoder of ``layout`` with the checkpoint's weights (read one tensor at a time)."""
    prefix = next((p for p in layout.prefixes if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        raise ArchitectureError(f"{name} must hold its text encoder (keys under {' or '.join(layout.prefixes)}), "
                                "but it has none. Use a full single-file checkpoint (UNet + text encoder + VAE).",
                                input_name="checkpoint")
    layer_re = re.compile(re.escape(prefix) + r"(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in keys if (m := layer_re.match(k))), default=-1)
    layers = depth - 1 if layout.layer == "penultimate" else depth
    if layers < 1:
        raise ArchitectureError(f"{name}'s text encoder under '{prefix}' must have transformer layers, but has "
                                f"{depth}.", input_name="checkpoint")
    state = _state_dict(keys, read, prefix, layout.style, layers)
    vocab, width = state["token_embedding.weight"].shape
    if vocab != tokenizer.vocab_size:
        raise ArchitectureError(f"{name}'s text encoder must use CLIP's {tokenizer.vocab_size}-token vocabulary, "
                                f"but its embedding has {vocab} rows.", input_name="checkpoint")
    config = ClipTextConfig(width=width, layers=layers, heads=width // 64, vocab_size=vocab,
                            context_length=int(state["position_embedding"].shape[0]), activation=layout.activation,
                            final_norm=layout.layer == "last")
    tok = copy.copy(tokenizer)  # shares the vocabulary; only the padding differs per encoder
    tok.pad_id = tokenizer.end_id if layout.pad_id is None else layout.pad_id
    encoder = ClipTextEncoder(config, tok)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArchitectureError(f"{name}'s text encoder under '{prefix}' must be a complete CLIP, but "
                                f"{len(missing)} weights are missing (first: {missing[:1]}) and "
                                f"{len(unexpected)} unexpected.", input_name="checkpoint")
    return encoder


class ConcatEncoder:
    """Several encoders' hidden states side by side (SDXL: CLIP-L then bigG); end-of-text
    positions and token ids from the first (they share the tokenizer's words)."""

    def __init__(self, encoders: Sequence[ClipTextEncoder]):
        self.encoders = list(encoders)

    def __call__(self, texts: Sequence[str], *, rows: str = "all") -> EncodedText:
        parts = [e(texts, rows=rows) for e in self.encoders]
        if len(parts) == 1:
            return parts[0]
        return EncodedText(parts[0].texts, torch.cat([p.hidden for p in parts], dim=-1), parts[0].eot_index,
                           token_ids=parts[0].token_ids)
