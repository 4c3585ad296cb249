"""Architectures as data: how to recognise a model from its weight keys, and where to edit it.

An :class:`ArchSpec` says which key marks the model family, the width of the text context its
cross-attention reads, and which weights are edit sites. Keys are matched by suffix, so a caller
may use any prefix (ComfyUI's ``diffusion_model.``, a checkpoint's ``model.diffusion_model.``).
Adding an architecture means adding a row to ``ARCHITECTURES``, not a branch in code.

UNets (SD1.x, SD2.x, SDXL) read the raw text at every ``attn2``; DiTs (Flux, SD3, Qwen-Image...)
read it through one linear layer where text enters the model (``txt_in``, ``context_embedder``),
after which text and image mix. A DiT row lists those layers as :class:`TextInput` s: the text
stream each reads (``tokens``: the per-token conditioning; ``pooled``: the pooled vector; one layer
of an encoder's per-layer states, :class:`LayerStreams`) and any per-row transform in front of it
(:class:`RowNorm`), so that keys are what the layer really reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ArchitectureError

__all__ = ["ARCHITECTURES", "ArchSpec", "AttentionSite", "LayerStreams", "LazyWeight", "RowNorm", "RowTransform",
           "TextInput", "detect", "layer_stream", "parse_layer_stream", "reference_site_shapes", "sites_by_stream",
           "supported_families"]


@dataclass(frozen=True)
class LazyWeight:
    """A weight materialised only when a method needs it (``load()``), so that a caller such as
    ComfyUI can hand over 140 SDXL sites without holding 140 fp32 copies at once. ``owned``: each
    ``load()`` returns a new tensor that the caller may keep (a patch then holds it without a copy)."""

    shape: tuple[int, int]
    load: Callable[[], torch.Tensor]
    owned: bool = False


@dataclass(frozen=True)
class RowNorm:
    """An RMSNorm in front of a text input (Qwen-Image's ``txt_norm``, Lumina 2's ``cap_embedder.0``):
    ``y = x / sqrt(mean(x²) + eps) ⊙ g`` per row. ``scale`` is the key suffix of ``g``."""

    scale: str
    eps: float


def layer_stream(source: str, layer: int) -> str:
    """The stream name of layer ``layer`` of an encoder's per-layer states (``"llama:31"``)."""
    return f"{source}:{layer}"


def parse_layer_stream(stream: str) -> tuple[str, int] | None:
    """``(source, layer)`` of a :func:`layer_stream` name; ``None`` for ``tokens``/``pooled``."""
    source, sep, layer = stream.rpartition(":")
    return (source, int(layer)) if sep and source and layer.isdigit() else None


def sites_by_stream(sites: Sequence[AttentionSite], *, tokens: bool = True) -> dict[str, list[AttentionSite]]:
    """The sites that read token rows, grouped by stream: ``tokens`` (unless ``tokens`` is False) and
    each per-layer stream (``"llama:k"``). Each group is a K/V space of its own."""
    groups: dict[str, list[AttentionSite]] = {}
    for site in sites:
        if (tokens and site.stream == "tokens") or parse_layer_stream(site.stream) is not None:
            groups.setdefault(site.stream, []).append(site)
    return groups


@dataclass(frozen=True)
class LayerStreams:
    """The streams of an indexed text input (a ``TextInput`` key with ``{i}``) whose site ``i`` reads
    layer ``table[i]`` of the encoder's per-layer states ``source``; ``table`` names the list in the
    model's config (HiDream: ``caption_projection.{i}`` reads Llama layer ``llama_layers[i]``). The
    input with the highest index reads ``last`` instead (HiDream's T5 projection); an index past the
    table that is not the last is read by nothing and is no site."""

    source: str
    table: str
    last: str = "tokens"

    def stream(self, index: int, highest: int, config: Mapping[str, Any]) -> str | None:
        if index == highest:
            return self.last
        table = config.get(self.table)
        if not isinstance(table, Sequence) or not table:
            raise ArchitectureError(
                f"the model's text inputs read the layers listed in its config's '{self.table}', but the model "
                "has no such list. Load the model with ComfyUI's own loader (it writes that config).",
                input_name="model")
        return layer_stream(self.source, int(table[index])) if index < len(table) else None


@dataclass(frozen=True, eq=False)
class RowTransform:
    """A :class:`RowNorm` bound to one model: ``scale`` is ``g [d]`` as the model uses it now.

    ``key`` names it (sites with the same transform share keys, hence one solve)."""

    key: str
    eps: float
    scale: torch.Tensor

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` rows -> the rows the following linear layer reads (float32)."""
        x = rows.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * self.scale.to(device=normed.device, dtype=normed.dtype)


@dataclass(frozen=True)
class AttentionSite:
    """One edit point: the caller's weight key, the text stream it reads, and its current weight.

    ``weight`` is ``[d_out, d_in]`` as the model uses it now (upstream patches included), either
    a tensor or a :class:`LazyWeight`. ``stream`` is ``"tokens"`` (per-token context),
    ``"pooled"`` or one layer of an encoder's per-layer states (:func:`layer_stream`). ``transform`` is what the model applies to every text row before this weight
    (``None``: it reads the encoder's rows as they are).
    """

    key: str
    weight: torch.Tensor | LazyWeight
    stream: str = "tokens"
    transform: RowTransform | None = None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def reads(self) -> tuple[str, str]:
        """What the site's keys are: ``(stream, transform key)``; sites reading the same share a solve."""
        return self.stream, (self.transform.key if self.transform is not None else "")

    def tensor(self) -> torch.Tensor:
        """The weight as a tensor (loading it if it is lazy)."""
        return self.weight.load() if isinstance(self.weight, LazyWeight) else self.weight


@dataclass(frozen=True)
class TextInput:
    """A linear layer where text enters a DiT: the key suffix of its weight ``[d_out, d_in]``,
    the text stream it reads and the per-row transform in front of it. A key with ``{i}`` names a
    list of layers (one per block); ``stream`` is then a :class:`LayerStreams` saying what each reads."""

    key: str
    stream: str | LayerStreams = "tokens"
    norm: RowNorm | None = None

    def index_of(self, key: str) -> int | None:
        """The ``{i}`` of ``key`` if it is one of this input's weights (``-1`` for a plain key)."""
        if "{i}" not in self.key:
            return -1 if _is_suffix(key, self.key) else None
        head, tail = (re.escape(part) for part in self.key.split("{i}", 1))
        found = re.search(rf"(?:^|\.){head}(\d+){tail}$", key)
        return int(found.group(1)) if found else None


@dataclass(frozen=True)
class ArchSpec:
    """How to recognise one architecture and where its text-reading weights are.

    ``marker``: a key suffix present only in this family; ``context_dim``: width of the text
    context the sites read (``None`` means "any": DiTs, whose width depends on the text encoder
    and which are recognised by keys alone); ``requires`` / ``forbids``: further key suffixes that
    must / must not be present; ``site_pattern``: regex on keys of the editable K/V weights of a
    UNet; ``inputs``: a DiT's text inputs (when given, they are the sites instead of
    ``site_pattern``); ``reason``: why a recognised family is refused (empty: supported).
    """

    name: str
    display_name: str
    marker: str
    context_dim: int | None
    site_pattern: str = r"attn2\.to_[kv]\.weight$"
    requires: tuple[str, ...] = ()
    forbids: tuple[str, ...] = ()
    inputs: tuple[TextInput, ...] = ()
    reason: str = ""

    @property
    def supported(self) -> bool:
        return not self.reason

    def matches(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        keys = list(shapes)
        if not _has_suffix(keys, self.marker):
            return False
        if not all(_has_suffix(keys, s) for s in self.requires):
            return False
        if any(_has_suffix(keys, s) for s in self.forbids):
            return False
        if self.context_dim is None:
            return True
        widths = {tuple(shapes[k])[-1] for k in self.site_keys(shapes)}
        return widths == {self.context_dim}

    def site_inputs(self, shapes: Mapping[str, Sequence[int]]) -> list[tuple[str, TextInput | None]]:
        """Every site key with its text input (``None`` for a UNet's K/V sites), sorted by key."""
        if self.inputs:
            found = [(k, inp) for inp in self.inputs for k in shapes if inp.index_of(k) is not None]
            return sorted(found, key=lambda pair: pair[0])
        pattern = re.compile(self.site_pattern)
        return [(k, None) for k in sorted(k for k in shapes if pattern.search(k))]

    def site_streams(self, shapes: Mapping[str, Sequence[int]],
                     config: Mapping[str, Any] | None = None) -> list[tuple[str, TextInput | None, str]]:
        """Every site the model reads: key, text input and the stream it reads, resolved against the
        model's ``config`` where a :class:`LayerStreams` needs it (sites read by nothing left out)."""
        pairs = self.site_inputs(shapes)
        highest = {inp: max(int(inp.index_of(k)) for k, i in pairs if i is inp)  # type: ignore[arg-type]
                   for _, inp in pairs if inp is not None and isinstance(inp.stream, LayerStreams)}
        out: list[tuple[str, TextInput | None, str]] = []
        for key, inp in pairs:
            stream: str | None = "tokens" if inp is None else inp.stream  # type: ignore[assignment]
            if inp is not None and isinstance(inp.stream, LayerStreams):
                stream = inp.stream.stream(int(inp.index_of(key)), highest[inp], config or {})  # type: ignore[arg-type]
            if stream is not None:
                out.append((key, inp, stream))
        return out

    def site_keys(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        return [k for k, _ in self.site_inputs(shapes)]

    def norm_key(self, shapes: Mapping[str, Sequence[int]], norm: RowNorm) -> str:
        """The caller's key of a :class:`RowNorm`'s scale (same prefix as the model's other keys)."""
        return next(k for k in sorted(shapes) if _is_suffix(k, norm.scale))


def _is_suffix(key: str, suffix: str) -> bool:
    return key == suffix or key.endswith("." + suffix)


def _has_suffix(keys: Sequence[str], suffix: str) -> bool:
    return any(_is_suffix(k, suffix) for k in keys)


_FLUX_BLOCK = "double_blocks.0.img_attn.norm.key_norm.scale"
_NO_LINEAR = ("its text enters through {what}, not one linear layer, so no closed-form edit of a "
              "text projection decides what the model reads")

# Order matters: a row is tried before the rows after it (Qwen-Image and Chroma also have a
# ``txt_in``; a refused family is named before a supported one could claim its keys).
ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("sd1", "Stable Diffusion 1.x", "input_blocks.0.0.weight", 768,
             forbids=("label_emb.0.0.weight",)),
    ArchSpec("sd2", "Stable Diffusion 2.x", "input_blocks.0.0.weight", 1024,
             forbids=("label_emb.0.0.weight",)),
    ArchSpec("sdxl", "Stable Diffusion XL", "input_blocks.0.0.weight", 2048,
             requires=("label_emb.0.0.weight",)),
    ArchSpec("hunyuan_video", "HunyuanVideo", "txt_in.individual_token_refiner.blocks.0.norm1.weight", None,
             reason=_NO_LINEAR.format(what="a token refiner (self-attention blocks over the text)")),
    ArchSpec("sd3", "Stable Diffusion 3 / 3.5", "context_embedder.weight", None,
             requires=("x_embedder.proj.weight", "joint_blocks.0.context_block.attn.qkv.weight"),
             inputs=(TextInput("context_embedder.weight"), TextInput("y_embedder.mlp.0.weight", "pooled"))),
    ArchSpec("qwen_image", "Qwen-Image", "txt_norm.weight", None, requires=("txt_in.weight", "img_in.weight"),
             inputs=(TextInput("txt_in.weight", norm=RowNorm("txt_norm.weight", 1e-6)),)),
    ArchSpec("chroma_radiance", "Chroma Radiance", "nerf_blocks.0.norm.scale", None,
             requires=("txt_in.weight", _FLUX_BLOCK), inputs=(TextInput("txt_in.weight"),)),
    ArchSpec("chroma", "Chroma", "distilled_guidance_layer.in_proj.weight", None,
             requires=("txt_in.weight", _FLUX_BLOCK), inputs=(TextInput("txt_in.weight"),)),
    ArchSpec("flux", "Flux (incl. Kontext)", "txt_in.weight", None,
             requires=(_FLUX_BLOCK, "img_in.weight"),
             inputs=(TextInput("txt_in.weight"), TextInput("vector_in.in_layer.weight", "pooled"))),
    ArchSpec("lumina2", "Lumina 2", "cap_embedder.1.weight", None,
             inputs=(TextInput("cap_embedder.1.weight", norm=RowNorm("cap_embedder.0.weight", 1e-5)),)),
    # HiDream: caption_projection.i reads Llama layer llama_layers[i] (ComfyUI's conditioning_llama3), the
    # last one T5's rows (the conditioning); p_embedder reads the pooled CLIP-L ⊕ G vector
    ArchSpec("hidream", "HiDream", "caption_projection.0.linear.weight", None,
             inputs=(TextInput("caption_projection.{i}.linear.weight", LayerStreams("llama", "llama_layers")),
                     TextInput("p_embedder.pooled_embedder.linear_1.weight", "pooled"))),
    ArchSpec("auraflow", "AuraFlow", "cond_seq_linear.weight", None, inputs=(TextInput("cond_seq_linear.weight"),)),
    ArchSpec("pixart", "PixArt", "y_embedder.y_proj.fc1.weight", None, requires=("t_block.1.weight",),
             inputs=(TextInput("y_embedder.y_proj.fc1.weight"),)),
    ArchSpec("ltxv", "LTX-Video", "caption_projection.linear_1.weight", None,
             requires=("adaln_single.emb.timestep_embedder.linear_1.bias",),
             inputs=(TextInput("caption_projection.linear_1.weight"),)),
    ArchSpec("wan", "WAN 2.x", "head.modulation", None, requires=("text_embedding.0.weight",),
             inputs=(TextInput("text_embedding.0.weight"),)),
)


def supported_families() -> str:
    """The supported families' display names, for error messages."""
    return ", ".join(s.display_name for s in ARCHITECTURES if s.supported)


def detect(shapes: Mapping[str, Sequence[int]]) -> ArchSpec:
    """Find the architecture whose spec matches these weight keys and shapes.

    Raises ArchitectureError for a recognised but refused family (naming it and the reason) and
    for a model no spec matches.
    """
    for spec in ARCHITECTURES:
        if spec.matches(shapes):
            if not spec.supported:
                raise ArchitectureError(
                    f"{spec.display_name} models are not supported: {spec.reason}. Supported families: "
                    f"{supported_families()}. Connect one of those.",
                    input_name="model",
                )
            return spec
    tried = ", ".join(s.name for s in ARCHITECTURES)
    raise ArchitectureError(
        f"unknown architecture: expected a model whose weight keys match one of ({tried}), but "
        f"none matched. Connect one of: {supported_families()}; or open an issue with the model name.",
        input_name="model",
    )


# Widths of the cross-attention blocks of the full-size models, for benchmarks and the demo:
# (ComfyUI block name, query width, transformer depth).
_REFERENCE_BLOCKS: dict[str, list[tuple[str, int, int]]] = {
    "sd1": [("input_blocks.1.1", 320, 1), ("input_blocks.2.1", 320, 1),
            ("input_blocks.4.1", 640, 1), ("input_blocks.5.1", 640, 1),
            ("input_blocks.7.1", 1280, 1), ("input_blocks.8.1", 1280, 1),
            ("middle_block.1", 1280, 1)]
    + [(f"output_blocks.{i}.1", w, 1)
       for i, w in [(3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640),
                    (9, 320), (10, 320), (11, 320)]],
    "sdxl": [("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2),
             ("input_blocks.7.1", 1280, 10), ("input_blocks.8.1", 1280, 10),
             ("middle_block.1", 1280, 10)]
    + [(f"output_blocks.{i}.1", w, d)
       for i, w, d in [(0, 1280, 10), (1, 1280, 10), (2, 1280, 10),
                       (3, 640, 2), (4, 640, 2), (5, 640, 2)]],
}
_REFERENCE_BLOCKS["sd2"] = _REFERENCE_BLOCKS["sd1"]


# Full-size DiT text inputs (key -> shape) plus the marker keys that make detect() recognise them.
_REFERENCE_DITS: dict[str, dict[str, tuple[int, ...]]] = {
    "flux": {"txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
             _FLUX_BLOCK: (128,), "img_in.weight": (3072, 64)},
    "sd35_large": {"context_embedder.weight": (2432, 4096), "y_embedder.mlp.0.weight": (2432, 2048),
                   "x_embedder.proj.weight": (2432, 16, 2, 2),
                   "joint_blocks.0.context_block.attn.qkv.weight": (7296, 2432)},
    "qwen_image": {"txt_in.weight": (3072, 3584), "txt_norm.weight": (3584,), "img_in.weight": (3072, 64)},
}


def reference_site_shapes(name: str, prefix: str = "diffusion_model.") -> dict[str, tuple[int, ...]]:
    """Key -> shape of every site of the full-size model ``name`` (``sd1``, ``sd2``, ``sdxl``,
    ``flux``, ``sd35_large``, ``qwen_image``), plus its marker keys, so that :func:`detect`
    recognises the result."""
    if name in _REFERENCE_DITS:
        return {prefix + k: v for k, v in _REFERENCE_DITS[name].items()}
    spec = next((s for s in ARCHITECTURES if s.name == name), None)
    if spec is None or name not in _REFERENCE_BLOCKS:
        raise ArchitectureError(
            f"no reference layout for '{name}'; expected one of {sorted([*_REFERENCE_BLOCKS, *_REFERENCE_DITS])}.",
            input_name="architecture",
        )
    assert spec.context_dim is not None  # supported specs always have a width
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}input_blocks.0.0.weight": (320, 4)}
    if spec.requires:
        shapes[f"{prefix}label_emb.0.0.weight"] = (1280, 2816)
    for block, width, depth in _REFERENCE_BLOCKS[name]:
        for i in range(depth):
            for proj in ("k", "v"):
                key = f"{prefix}{block}.transformer_blocks.{i}.attn2.to_{proj}.weight"
                shapes[key] = (width, spec.context_dim)
    return shapes
