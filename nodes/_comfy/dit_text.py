"""Text through a DiT's text encoders (T5, CLIP-L + T5, Qwen2.5-VL, Gemma, Llama...): the user's CLIP as
the core's ``TextEncoder`` for Flux, SD3, Qwen-Image, Lumina 2 and the other DiT families.

ComfyUI's UNet CLIPs (SD1.x, SD2.x, SDXL) go through ``text.ComfyClipEncoder``; every other CLIP comes
here. Prompts are encoded one at a time with ``encode_from_tokens`` (the same call CLIPTextEncode
makes), so every family's own assembly of its streams (SD3's CLIP rows before T5's, Qwen-Image's
template prefix dropped) is what the keys see.

Which rows hold the prompt's words is read from the tokens of the *main* stream (the one whose
tokens become the conditioning's rows): a probe prompt and the empty prompt give, once per encoder,
how many template tokens come before the words and how many after them (T5's ``</s>``,
Qwen's ``<|im_end|>...assistant``), after trailing padding is dropped. The conditioning's rows are
aligned with the stream's tokens at their ends (SD3's CLIP rows precede the T5 rows; Qwen-Image
drops leading template rows). Prompts of different lengths are padded with zero rows, which add
nothing to any key Gram.

Some encoders also return every layer of a second encoder beside the conditioning (HiDream's Llama
as ``conditioning_llama3`` ``[1, L, T, D]``, each DiT text input reading one layer): those come back
as ``EncodedText.layered``, their rows aligned with that encoder's own tokens in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...erasure_core import ArchitectureError, ConceptError, EncodedText, Progress
from ...erasure_core.text.encoded import LayerStates
from .runtime import _short

# Tokenizer streams that become the conditioning's rows, most specific first; the CLIP streams come
# last (SD3 without its T5 reads only the CLIP rows).
MAIN_STREAMS = ("t5xxl", "umt5xxl", "pile_t5xl", "t5base", "qwen25_7b", "qwen25_3b", "gemma2_2b", "gemma3_4b",
                "llama", "l", "g")
# The CLIP object's encoder attribute of a stream, where it differs from the stream's name.
_ENCODER_ATTR = {"l": "clip_l", "g": "clip_g"}
# Per-layer states an encoder returns beside its conditioning: ComfyUI's conditioning key -> the tokenizer
# stream whose tokens are its rows (also the name the architecture rows read them by, ``"llama:k"``).
LAYERED_OUTPUTS = {"conditioning_llama3": "llama"}
_PROBE = "zebra"


def split_output(out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor],
                                               dict[str, Any]]:
    """``encode_from_tokens(..., return_pooled=True, return_dict=True)`` of one prompt as ``(rows [T, D],
    pooled or None, per-layer states {name: [L, T, D]}, every other entry)``, all float32 (``out`` is
    not changed)."""
    rest = dict(out)
    cond, pooled = rest.pop("cond"), rest.pop("pooled_output", None)
    layers = {name: rest.pop(key)[0].float() for key, name in LAYERED_OUTPUTS.items()
              if isinstance(rest.get(key), torch.Tensor) and rest[key].ndim == 4}
    return cond[0].float(), (pooled.float() if isinstance(pooled, torch.Tensor) else None), layers, rest


def is_unet_clip(clip: Any) -> bool:
    """Whether ``clip`` is an SD1.x/SD2.x/SDXL CLIP (only 77-token CLIP windows), which the UNet
    encoder serves."""
    streams = set(clip.tokenize(""))
    return bool(streams) and streams <= {"l", "g", "h"} and all(
        len(w[0]) == 77 for w in clip.tokenize("").values())


def _ids(window: Sequence[Any]) -> list[int]:
    return [int(tok[0]) if isinstance(tok[0], int) else -1 for tok in window]


def _strip(ids: list[int], pad: int) -> list[int]:
    end = len(ids)
    while end > 0 and ids[end - 1] == pad:
        end -= 1
    return ids[:end]


class DitClipEncoder:
    """The user's CLIP (any ComfyUI text encoder with a token-level conditioning) as a core
    ``TextEncoder``: same tokenizer, weights syntax, templates and patches as their prompts.

    ``hidden [N, T, D]`` are the conditioning rows, ``eot_index`` the row right after each
    prompt's words (T5's ``</s>``, Qwen's ``<|im_end|>``; a zero row when nothing follows them), and
    ``pooled [N, P]`` the pooled vector when the CLIP returns one (Flux's CLIP-L, SD3's CLIP-L ⊕ G).
    """

    def __init__(self, clip: Any, progress: Progress | None = None, text_length: int = 0):
        self.clip = clip
        self.progress = progress
        tokens = clip.tokenize("")
        self.stream = self._main_stream(clip, tokens)
        model = clip.cond_stage_model
        # {conditioning key: tokenizer stream} of the per-layer states this CLIP returns
        self.layered = {key: name for key, name in LAYERED_OUTPUTS.items()
                        if name in tokens and getattr(model, name, None) is not None}
        # ComfyUI's per-stream tokenizer option: pad the main stream to at least ``text_length`` tokens
        self.options = {"tokenizer_options": {f"{self.stream}_min_length": text_length}} if text_length else {}
        empty, probe = self._tokenize(""), self._tokenize(_PROBE)
        self.layout = {name: self._layout(empty[name][0], probe[name][0])
                       for name in {self.stream, *self.layered.values()}}
        self.pad, self.after = self.layout[self.stream]

    @staticmethod
    def _layout(empty: Sequence[Any], probe: Sequence[Any]) -> tuple[int, int]:
        """``(pad id, template tokens after the words)`` of one tokenizer stream: the empty prompt's last
        id, and the common suffix of the empty prompt and a probe once padding is dropped."""
        e = _ids(empty)
        pad = e[-1] if e else -1
        e, x = _strip(e, pad), _strip(_ids(probe), pad)
        after = 0
        while after < len(e) and e[len(e) - 1 - after] == x[len(x) - 1 - after]:
            after += 1
        return pad, after

    def _align(self, text: str, rows: int, window: Sequence[Any], stream: str) -> tuple[int, list[int]]:
        """The EOT row and per-row token ids of ``rows`` conditioning rows made from ``window`` (one
        tokenizer stream's tokens), aligned at their ends."""
        ids = _ids(window)
        pad, after = self.layout[stream]
        offset = rows - len(ids)  # > 0: rows before the stream's (SD3's CLIP); < 0: tokens dropped
        eot = len(_strip(ids, pad)) - after + offset
        if eot < 0:
            raise ConceptError(f"'{_short(text)}' has no rows in the conditioning after tokenising; shorten "
                               "the concept.", input_name="concepts")
        return eot, [-1] * max(offset, 0) + ids[max(-offset, 0):]

    @staticmethod
    def _main_stream(clip: Any, tokens: dict[str, Any]) -> str:
        model = clip.cond_stage_model
        for name in MAIN_STREAMS:
            if name in tokens and getattr(model, _ENCODER_ATTR.get(name, name), model) is not None:
                return name
        raise ArchitectureError(
            f"the text encoder must have a token stream the pack knows ({', '.join(MAIN_STREAMS)}), but it has "
            f"{sorted(tokens)}. Connect the CLIP loaded for this model (its CLIPLoader type).", input_name="clip")

    def _tokenize(self, text: str) -> dict[str, Any]:
        return self.clip.tokenize(text, **self.options)

    def _encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None, int, list[int], dict[str, Any]]:
        tokens = self._tokenize(text)
        for name in (self.stream, *self.layered.values()):
            if len(tokens[name]) != 1:
                raise ConceptError(f"each concept must fit in one window of the text encoder, but '{_short(text)}' "
                                   f"needs {len(tokens[name])}. Shorten the concept (or its template).",
                                   input_name="concepts")
        rows, pooled, layers, _ = split_output(self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True))
        rows = rows.cpu()
        eot, row_ids = self._align(text, rows.shape[0], tokens[self.stream][0], self.stream)
        pooled = pooled.cpu().reshape(-1) if pooled is not None else None
        layered = {}
        for name in self.layered.values():
            if name in layers:
                layer_rows = layers[name].cpu()  # [L, T, D]
                layered[name] = (layer_rows, *self._align(text, layer_rows.shape[1], tokens[name][0], name))
        return rows, pooled, eot, row_ids, layered

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        texts = list(texts)
        done = []
        for i, text in enumerate(texts):
            done.append(self._encode_one(text))
            if self.progress is not None:
                self.progress(i + 1, len(texts))
        if not done:
            return EncodedText((), torch.zeros(0, 1, 1), torch.zeros(0, dtype=torch.long))
        hidden, eot, ids = _stack([(r, e, i) for r, _, e, i, _ in done])
        pooled = [p for _, p, _, _, _ in done]
        stacked = torch.stack(pooled) if all(p is not None for p in pooled) else None  # type: ignore[arg-type]
        names = set.intersection(*(set(x[4]) for x in done))
        layered = {}
        for name in sorted(names):  # [N, L, T, D], padded along T in place (one copy)
            layered[name] = LayerStates(*_stack([x[4][name] for x in done], axis=1))
        return EncodedText(tuple(texts), hidden, eot, pooled=stacked, token_ids=ids, layered=layered)


def _stack(items: list[tuple[torch.Tensor, int, list[int]]], axis: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Per-prompt ``(rows, eot, row ids)`` with ``T_i`` rows along ``axis`` (``[T_i, D]``; per-layer
    states ``[L, T_i, D]`` with ``axis=1``) as one tensor ``[N, ...]`` padded to ``T`` along it (zero
    rows after each prompt's own), ``eot [N]`` and ``ids [N, T]`` (-1 there)."""
    length = max(max(r.shape[axis], eot + 1) for r, eot, _ in items)
    shape = list(items[0][0].shape)
    shape[axis] = length
    hidden = items[0][0].new_zeros((len(items), *shape))
    ids = torch.full((len(items), length), -1, dtype=torch.long)
    for i, (rows, _, row_ids) in enumerate(items):
        hidden[i].narrow(axis, 0, rows.shape[axis]).copy_(rows)
        ids[i, : len(row_ids)] = torch.tensor(row_ids[: rows.shape[axis]], dtype=torch.long)
    return hidden, torch.tensor([e for _, e, _ in items], dtype=torch.long), ids
