"""Text through the user's CLIP: the core's TextEncoder over ComfyUI's CLIP, the encoding cache, token
counting, single-prompt encodings and CONDITIONING, and the CLIP as a map from token ids."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import comfy.clip_model
import comfy.ops
import comfy.sd1_clip
import comfy.sdxl_clip
import folder_paths
import torch

from ...erasure_core import (
    ConceptError,
    EncodedText,
    Progress,
)
from ...erasure_core.attacks import (
    decode_bpe_tokens,
)
from ...erasure_core.text.cache import CachedEncoder
from ...erasure_core.text.clip import TREE_MAX_LENGTH, BPETokenizer
from ...erasure_core.text.prefix_tree import PrefixTree, tree_attention
from .dit_text import LAYERED_OUTPUTS, DitClipEncoder, is_unet_clip, split_output
from .runtime import _short

logger = logging.getLogger(__name__)




ROW_BUDGET = 32 * 77
"""Token positions per pass through the CLIP (32 prompts of 77 tokens; more prompts when shorter)."""


class ComfyClipEncoder:
    """The user's CLIP as a core ``TextEncoder``: same tokenizer, weights syntax, layer choice and
    CLIP patches as their prompts. Prompts are encoded in batches of 77-token windows.

    ``rows="through_eot"`` (token picks that read nothing after a prompt's end of text; also
    ``"through_last_word"``, which a prefix tree stops one row earlier): where
    every tower is a causal CLIP (SD1.x, SD2.x, SDXL), each batch stops at its longest prompt's
    EOT, through ComfyUI's own layers (:func:`encode_causal_prefix`); any other encoder runs its
    whole window."""

    accepts_rows = True
    accepts_last_word = True  # through a prefix tree; otherwise answered as "through_eot"

    def __init__(self, clip: Any, batch_size: int = 32, progress: Progress | None = None):
        self.clip = clip
        self.batch_size = batch_size
        self.progress = progress
        self.seconds = 0.0  # time spent inside the CLIP (tokenising excluded)

    def _windows(self, text: str) -> dict[str, list[Any]]:
        tokens = self.clip.tokenize(text)
        for windows in tokens.values():
            if len(windows) != 1:
                raise ConceptError(
                    f"each concept must fit in one 75-token CLIP window, but '{_short(text)}' "
                    f"needs {len(windows)}. Shorten the concept (or its template).",
                    input_name="concepts",
                )
        return {name: windows[0] for name, windows in tokens.items()}

    def __call__(self, texts: Sequence[str], rows: str = "all") -> EncodedText:
        texts = list(texts)
        empty = self._windows("")
        stream = next(iter(empty))
        end_id = empty[stream][1][0]  # [start, end, pad...]: the end-of-text id
        window = len(empty[stream])
        windows = [self._windows(t) for t in texts]
        eot = []
        for text, w in zip(texts, windows, strict=True):
            ids = [tok[0] for tok in w[stream]]
            found = [j for j, tok in enumerate(ids) if j > 0 and isinstance(tok, int) and tok == end_id]
            if not found:
                raise ConceptError(f"'{_short(text)}' has no end-of-text token after tokenising; "
                                   "shorten the concept.", input_name="concepts")
            eot.append(found[0])
        eots = torch.tensor(eot, dtype=torch.long)
        short = rows != "all" and bool(texts) and causal_towers(self.clip) is not None
        # each prompt's own stop: its EOT, or its last word (the start token for "")
        ends = [e + 1 if rows == "through_eot" else max(e, 1) for e in eot]
        length = int(eots.max()) + 1 if short else window
        hidden = torch.zeros(len(texts), length, 1)
        # a prefix tree needs plain token ids at weight 1 (no embeddings or weights syntax)
        tree = short and length <= TREE_MAX_LENGTH and all(
            isinstance(tok[0], int) and tok[1] == 1.0 for w in windows for ws in w.values() for tok in ws[:length])
        if tree:  # prompts that share a prefix share a pass
            order = torch.tensor(sorted(range(len(texts)), key=lambda i: [t[0] for t in windows[i][stream][: ends[i]]]),
                                 dtype=torch.long)
        else:  # similar lengths together, so each pass stops near its prompts' own EOT
            order = torch.argsort(eots, stable=True) if short else torch.arange(len(texts))
        take = max(self.batch_size, ROW_BUDGET // length)  # more prompts per pass when they are short
        done = 0
        started = time.perf_counter()
        while done < len(texts):
            part = order[done : done + take].tolist()
            stop = int(eots[part].max()) + 1 if short else window
            batch = [windows[i] for i in part]
            if tree:
                cond = encode_causal_tree(self.clip, {name: [w[name][: ends[i]] for w, i in zip(batch, part, strict=True)]
                                                      for name in batch[0]})
                stop = cond.shape[1]
            elif short:
                cond = encode_causal_prefix(self.clip, {name: [w[name][:stop] for w in batch] for name in batch[0]})
            else:
                cond = self.clip.encode_from_tokens({name: [w[name] for w in batch] for name in batch[0]})
            cond = cond.reshape(len(batch), -1, cond.shape[-1]).float().cpu()  # windows were concatenated
            if hidden.shape[-1] != cond.shape[-1]:
                hidden = torch.zeros(len(texts), length, cond.shape[-1])
            hidden[torch.tensor(part), :stop] = cond
            done += len(part)
            if self.progress is not None:
                self.progress(done, len(texts))
        self.seconds += time.perf_counter() - started
        ids = torch.tensor([[tok[0] if isinstance(tok[0], int) else -1 for tok in w[stream][:length]] for w in windows],
                           dtype=torch.long).reshape(len(texts), -1)
        return EncodedText(tuple(texts), hidden, eots, token_ids=ids)


def causal_towers(clip: Any) -> list[tuple[str, Any]] | None:
    """``[(token stream, SDClipModel)]`` in the order their outputs are concatenated, when every
    tower of ``clip`` is ComfyUI's causal CLIP text model run the standard way (SD1.x, SD2.x,
    SDXL and its refiner); ``None`` for anything else (T5, LLM encoders, custom subclasses)."""
    model = getattr(clip, "cond_stage_model", None)
    if type(model) is comfy.sdxl_clip.SDXLClipModel:
        towers = [("l", model.clip_l), ("g", model.clip_g)]
    elif isinstance(model, comfy.sd1_clip.SD1ClipModel) \
            and type(model).encode_token_weights is comfy.sd1_clip.SD1ClipModel.encode_token_weights:
        towers = [(model.clip_name, getattr(model, model.clip, None))]
    else:
        return None
    for _, tower in towers:
        if not (isinstance(tower, comfy.sd1_clip.SDClipModel)
                and type(tower).forward is comfy.sd1_clip.SDClipModel.forward
                and type(tower).encode_token_weights is comfy.sd1_clip.ClipTokenWeightEncoder.encode_token_weights
                and type(getattr(tower, "transformer", None)) is comfy.clip_model.CLIPTextModel
                and type(tower.transformer.text_model) is comfy.clip_model.CLIPTextModel_
                and type(tower.transformer.text_model.encoder) is comfy.clip_model.CLIPEncoder
                and tower.layer in ("last", "hidden")):
            return None
    return towers


@torch.no_grad()
def encode_causal_prefix(clip: Any, tokens: dict[str, list[list[Any]]]) -> torch.Tensor:
    """``clip.encode_from_tokens(tokens)`` for token windows cut to a common length ``L < 77``
    (``[1, N·L, D]``): what the 77-token encoding gives at those positions, since a causal CLIP's
    row ``i`` sees only positions ``≤ i``. ComfyUI's own modules compute it (CLIP patches, layer
    choice, weights syntax, embeddings); only the position table is cut to ``L`` and the layers
    after the selected one (clip skip) are not run. Needs :func:`causal_towers`."""
    _prepare(clip)
    parts = [_tower_prefix(tower, tokens[name]) for name, tower in causal_towers(clip)]
    return torch.cat(parts, dim=-1).reshape(1, -1, sum(p.shape[-1] for p in parts))


@torch.no_grad()
def encode_causal_tree(clip: Any, tokens: dict[str, list[list[Any]]]) -> torch.Tensor:
    """:func:`encode_causal_prefix` for windows of plain token ids at weight 1, each cut at its own
    EOT (lengths differ), ``[N, L, D]`` zero after each prompt's end: each distinct prefix is
    computed once (``erasure_core.text.prefix_tree``) through ComfyUI's own layer modules (its
    projections, norms and MLP, CLIP patches included); only attention runs per node over its path."""
    _prepare(clip)
    parts = [_tower_tree(tower, PrefixTree.build([[tok[0] for tok in x] for x in tokens[name]]))
             for name, tower in causal_towers(clip)]
    return torch.cat(parts, dim=-1)


def _prepare(clip: Any) -> None:
    """The CLIP's layer choice set on its towers, as ``CLIP.encode_from_tokens`` sets it, and the model loaded."""
    model = clip.cond_stage_model
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()


def _selected_layers(tower: Any) -> Any:
    """The encoder layers a tower runs: through the selected one ("hidden", clip skip), else all."""
    layers = tower.transformer.text_model.encoder.layers
    last = len(layers) - 1
    if tower.layer == "hidden":
        last = tower.layer_idx + len(layers) if tower.layer_idx < 0 else tower.layer_idx
    return layers[: last + 1]


def _final(tower: Any, x: torch.Tensor) -> torch.Tensor:
    """The final layer norm where the tower applies it (the last layer, or a normed hidden one)."""
    if tower.layer == "last" or tower.layer_norm_hidden_state:
        return tower.transformer.text_model.final_layer_norm(x)
    return x


def _tower_tree(tower: Any, tree: PrefixTree) -> torch.Tensor:
    """One tower over a prefix tree: what :func:`_tower_forward` gives at each prompt's rows."""
    embeddings = tower.transformer.get_input_embeddings()
    device = embeddings.weight.device
    x = embeddings(tree.tokens.to(device)[None], out_dtype=torch.float32)[0]
    text_model = tower.transformer.text_model
    positions = comfy.ops.cast_to(text_model.embeddings.position_embedding.weight, dtype=torch.float32, device=x.device)
    x = x + positions[tree.positions.to(x.device)]
    for layer in _selected_layers(tower):
        attn, h = layer.self_attn, layer.layer_norm1(x)
        x = x + attn.out_proj(tree_attention(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), tree, attn.heads))
        x = x + layer.mlp(layer.layer_norm2(x))
    return tree.gather(_final(tower, x).float()).cpu()


def _tower_prefix(tower: Any, pairs: list[list[Any]]) -> torch.Tensor:
    """One tower's ``[N, L, D]`` for windows of ``(token, weight)`` pairs (ComfyUI's
    ``ClipTokenWeightEncoder.encode_token_weights``: weights pull a row away from the empty
    prompt's row at that position)."""
    to_encode = [[tok[0] for tok in x] for x in pairs]
    weighted = any(tok[1] != 1.0 for x in pairs for tok in x)
    if weighted:
        make_empty = getattr(tower, "gen_empty_tokens", comfy.sd1_clip.gen_empty_tokens)
        to_encode.append(make_empty(tower.special_tokens, max(len(t) for t in to_encode)))
    out = _tower_forward(tower, to_encode)
    z = out[: len(pairs)]
    if weighted:
        weights = torch.tensor([[tok[1] for tok in x] for x in pairs], dtype=z.dtype, device=z.device)
        z = (z - out[-1]) * weights[..., None] + out[-1]
    return z.cpu()


def _tower_forward(tower: Any, tokens: list[list[Any]]) -> torch.Tensor:
    """``SDClipModel.forward(tokens)[0]`` for windows shorter than the context (``[N, L, D]``)."""
    device = tower.transformer.get_input_embeddings().weight.device
    embeds, attention_mask, _, _ = tower.process_tokens(tokens, device)
    text_model = tower.transformer.text_model
    length = embeds.shape[1]
    positions = comfy.ops.cast_to(text_model.embeddings.position_embedding.weight, dtype=torch.float32,
                                  device=embeds.device)
    x = embeds + positions[:length]
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    if tower.enable_attention_masks:  # padding keys masked as well (after each EOT: unread rows)
        pad = 1.0 - attention_mask.to(x.dtype).reshape(len(tokens), 1, 1, length)
        mask = pad.masked_fill(pad.to(torch.bool), -torch.finfo(x.dtype).max) + mask
    attention = comfy.clip_model.optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in _selected_layers(tower):
        x = layer(x, mask, attention)
    z = _final(tower, x).float()
    if tower.zero_out_masked:
        z = z * attention_mask.unsqueeze(-1).float()
    return z


def clip_fingerprint(clip: Any) -> str:
    """A key that changes whenever ``clip`` would encode differently: its class, the selected
    layer, samples of its weights and every patch on it (CLIP LoRAs)."""
    digest = hashlib.sha256()
    model = clip.cond_stage_model
    digest.update(f"{type(model).__name__}|{getattr(clip, 'layer_idx', None)}".encode())
    state = model.state_dict()
    names = sorted(state)
    for name in names[:: max(1, len(names) // 16)]:
        digest.update(name.encode())
        digest.update(state[name].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    for key in sorted(clip.patcher.patches):
        digest.update(key.encode() if isinstance(key, str) else repr(key).encode())
        for patch in clip.patcher.patches[key]:
            digest.update(repr((patch[0], patch[2], type(patch[1]).__name__)).encode())
            for tensor in _tensors(patch[1]):
                digest.update(repr((tuple(tensor.shape), float(tensor.float().sum()))).encode())
    return digest.hexdigest()[:24]



def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return _tensors(getattr(value, "weights", ())) if hasattr(value, "weights") else []



def cached_encoder(clip: Any, progress: Progress | None = None, text_length: int = 0) -> CachedEncoder:
    """The user's CLIP as a TextEncoder whose encodings persist in ComfyUI's user folder, so a
    large preserve set is encoded once per text encoder. SD1.x/SD2.x/SDXL CLIPs are encoded in
    77-token windows; every other text encoder (T5, Qwen, Gemma... of a DiT) by ``DitClipEncoder``,
    its main stream padded to ``text_length`` tokens when that is above 0 (UCE's Flux setting)."""
    folder = os.path.join(folder_paths.get_user_directory(), "concept_erasure", "encodings")
    if is_unet_clip(clip):
        return CachedEncoder(ComfyClipEncoder(clip, progress=progress), folder, clip_fingerprint(clip))
    encoder = DitClipEncoder(clip, progress, text_length)
    # the per-layer streams it returns are part of what a cached prompt holds (HiDream's Llama layers)
    fingerprint = (clip_fingerprint(clip) + (f"-len{text_length}" if text_length else "")
                   + "".join(f"-layers-{name}" for name in sorted(encoder.layered.values())))
    return CachedEncoder(encoder, folder, fingerprint)



@functools.lru_cache(maxsize=1)
def clip_token_counter() -> Callable[[str], int]:
    """Counts CLIP BPE tokens (SD1.x, SD2.x and SDXL share the vocabulary) with ComfyUI's merges
    (read once per process; every queued Load Concepts checks its prompts with it)."""
    merges = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer", "merges.txt")
    tokenizer = BPETokenizer(merges)
    return lambda text: len(tokenizer.ids(text))



def encode_first_windows(clip: Any, texts: Sequence[str], progress: Progress | None = None,
                         chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor, set[int], list[bool]]:
    """Per-token hidden states of the first 77-token window of each text, as the user's CLIP
    encodes it (layer choice, weights syntax and CLIP patches included): ``hidden [N, 77, D]``
    float32, ``ids [N, 77]`` (-1 where an embedding vector sits), the special token ids (start,
    end, pad: every id of the empty prompt's window) and, per text, whether it was longer than
    one window (SPM's reference truncates to 77 tokens too). Encoded ``chunk`` texts per CLIP
    call, ``progress(done, N)`` before each and at the end (it also stops on Cancel)."""
    texts = list(texts)
    empty = clip.tokenize("")
    stream = next(iter(empty))
    special = {int(t[0]) for t in empty[stream][0] if isinstance(t[0], int)}
    firsts, truncated = [], []
    for text in texts:
        tokens = clip.tokenize(text)
        firsts.append({name: windows[0] for name, windows in tokens.items()})
        truncated.append(any(len(windows) > 1 for windows in tokens.values()))
    parts = []
    for start in range(0, len(firsts), chunk):
        if progress is not None:
            progress(start, len(firsts))
        part = firsts[start : start + chunk]
        cond = clip.encode_from_tokens({name: [w[name] for w in part] for name in part[0]})
        parts.append(cond.reshape(len(part), -1, cond.shape[-1]).float().cpu())
    if progress is not None:
        progress(len(firsts), len(firsts))
    hidden = torch.cat(parts)
    ids = torch.tensor([[tok[0] if isinstance(tok[0], int) else -1 for tok in w[stream]] for w in firsts],
                       dtype=torch.long)
    return hidden, ids, special, truncated



def _one_window(clip: Any, text: str, input_name: str) -> dict[str, list[Any]]:
    tokens = clip.tokenize(text)
    for windows in tokens.values():
        if len(windows) != 1:
            raise ConceptError(
                f"the prompt must fit in one 75-token CLIP window, but '{_short(text)}' needs "
                f"{len(windows)}. Shorten it.", input_name=input_name)
    return tokens



def encode_text(clip: Any, text: str, input_name: str = "concept") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cond [T, D] float32, pooled [1, P] or None)`` of one prompt through the user's CLIP (its
    layer choice, weights syntax, embeddings and patches), as CLIPTextEncode would encode it."""
    return encode_text_layers(clip, text, input_name)[:2]



def encode_text_layers(clip: Any, text: str, input_name: str = "concept") -> tuple[
        torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`encode_text` plus the per-layer states the CLIP returns beside the conditioning, by the
    name the architecture rows read them by (HiDream: ``{"llama": [L, T, D]}``; empty for others), and
    every other entry of its conditioning (Lumina 2's ``attention_mask``) to pass on as it is."""
    return split_output(clip.encode_from_tokens(_one_window(clip, text, input_name), return_pooled=True,
                                                return_dict=True))


def conditioning(cond: torch.Tensor, pooled: torch.Tensor | None, layers: dict[str, torch.Tensor] | None = None,
                 extra: dict[str, Any] | None = None) -> list[list[Any]]:
    """A CONDITIONING (``[[cond [1, T, D], {"pooled_output": ..., per-layer states, extra}]]``) for
    KSampler; ``layers`` and ``extra`` as :func:`encode_text_layers` gives them (HiDream's
    ``conditioning_llama3``). ``pooled_output`` is there even when None, as CLIP Text Encode puts it
    (Chroma's model reads the key)."""
    out: dict[str, Any] = dict(extra or {})
    out["pooled_output"] = None if pooled is None else pooled.detach().cpu().float()
    keys = {name: key for key, name in LAYERED_OUTPUTS.items()}
    for name, states in (layers or {}).items():
        out[keys[name]] = states.detach().cpu().float()[None]
    return [[cond.detach().reshape(1, -1, cond.shape[-1]).cpu().float(), out]]



class ClipTokenSpace:
    """The user's CLIP seen as a map from token ids to encodings, for searches over the vocabulary.

    ``encode_ids(ids [N, K])`` encodes the prompts ``[start, ids..., end, padding]`` (every text
    stream of the CLIP gets the same ids: SD1.x, SD2.x and SDXL share CLIP's vocabulary),
    ``vocabulary`` holds every id except the special tokens, ``decode(ids)`` gives the text.
    """

    def __init__(self, clip: Any, batch_size: int = 32):
        self.clip, self.batch_size = clip, batch_size
        template = clip.tokenize("")
        self.layout = {name: (w[0][0][0], w[0][1][0], w[0][-1][0], len(w[0])) for name, w in template.items()}
        specials = {v for name in self.layout for v in self.layout[name][:3]}
        self.inv_vocab = self._inv_vocab(clip)
        if self.inv_vocab:
            ids = sorted(i for i in self.inv_vocab if i not in specials)
        else:  # a CLIP without a readable vocabulary: ids below the start token
            start = min(v[0] for v in self.layout.values())
            ids = [i for i in range(start) if i not in specials]
        self.vocabulary = torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def _inv_vocab(clip: Any) -> dict[int, str]:
        for value in vars(getattr(clip, "tokenizer", object())).values():
            inv = getattr(value, "inv_vocab", None)
            if isinstance(inv, dict) and inv:
                return inv
        return {}

    @property
    def max_length(self) -> int:
        return min(v[3] for v in self.layout.values()) - 2

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        chunks = []
        for first in range(0, len(ids), self.batch_size):
            batch = ids[first : first + self.batch_size].tolist()
            tokens = {}
            for name, (start, end, pad, length) in self.layout.items():
                tokens[name] = [[(t, 1.0) for t in [start, *row, end] + [pad] * (length - len(row) - 2)]
                                for row in batch]
            cond = self.clip.encode_from_tokens(tokens)
            chunks.append(cond.reshape(len(batch), -1, cond.shape[-1]).float())
        return torch.cat(chunks)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, with ``(`` and ``)`` escaped so that typing it does not weight tokens."""

        if not self.inv_vocab:
            return ""
        text = decode_bpe_tokens([self.inv_vocab.get(int(i), "") for i in ids])
        return text.replace("\\", " ").replace("(", "\\(").replace(")", "\\)")
