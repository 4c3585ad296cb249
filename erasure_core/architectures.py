"""Architectures as data: how to recognise a model from its weight keys, and where to edit it.

An :class:`ArchSpec` says which key marks the model family, the width of the text context its
cross-attention reads, and which weights are edit sites. Keys are matched by suffix, so a caller
may use any prefix (ComfyUI's ``diffusion_model.``, a checkpoint's ``model.diffusion_model.``).
Adding an architecture means adding a row to ``ARCHITECTURES``, not a branch in code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import ArchitectureError

__all__ = ["ARCHITECTURES", "ArchSpec", "AttentionSite", "LazyWeight", "detect", "reference_site_shapes"]


@dataclass(frozen=True)
class LazyWeight:
    """A weight materialised only when a method needs it (``load()``), so that a caller such as
    ComfyUI can hand over 140 SDXL sites without holding 140 fp32 copies at once."""

    shape: tuple[int, int]
    load: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class AttentionSite:
    """One edit point: the caller's weight key, the text stream it reads, and its current weight.

    ``weight`` is ``[d_out, d_in]`` as the model uses it now (upstream patches included), either
    a tensor or a :class:`LazyWeight`. ``stream`` is ``"tokens"`` (per-token context) or
    ``"pooled"``.
    """

    key: str
    weight: torch.Tensor | LazyWeight
    stream: str = "tokens"

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def tensor(self) -> torch.Tensor:
        """The weight as a tensor (loading it if it is lazy)."""
        return self.weight.load() if isinstance(self.weight, LazyWeight) else self.weight


@dataclass(frozen=True)
class ArchSpec:
    """How to recognise one architecture and where its text-reading weights are.

    ``marker``: a key suffix present only in this family; ``context_dim``: width of the text
    context the sites read (``None`` means "any", used for unsupported families);
    ``requires`` / ``forbids``: further key suffixes that must / must not be present;
    ``site_pattern``: regex on keys of the editable K/V weights; ``supported``: False for families
    we recognise only to explain that they are not supported yet.
    """

    name: str
    display_name: str
    marker: str
    context_dim: int | None
    site_pattern: str = r"attn2\.to_[kv]\.weight$"
    requires: tuple[str, ...] = ()
    forbids: tuple[str, ...] = ()
    supported: bool = True

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

    def site_keys(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        pattern = re.compile(self.site_pattern)
        return sorted(k for k in shapes if pattern.search(k))


def _has_suffix(keys: Sequence[str], suffix: str) -> bool:
    return any(k == suffix or k.endswith("." + suffix) for k in keys)


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("sd1", "Stable Diffusion 1.x", "input_blocks.0.0.weight", 768,
             forbids=("label_emb.0.0.weight",)),
    ArchSpec("sd2", "Stable Diffusion 2.x", "input_blocks.0.0.weight", 1024,
             forbids=("label_emb.0.0.weight",)),
    ArchSpec("sdxl", "Stable Diffusion XL", "input_blocks.0.0.weight", 2048,
             requires=("label_emb.0.0.weight",)),
    ArchSpec("sd3", "Stable Diffusion 3", "context_embedder.weight", None,
             requires=("x_embedder.proj.weight",), supported=False),
    ArchSpec("flux", "Flux", "txt_in.weight", None,
             requires=("double_blocks.0.txt_attn.qkv.weight",), supported=False),
)


def detect(shapes: Mapping[str, Sequence[int]]) -> ArchSpec:
    """Find the architecture whose spec matches these weight keys and shapes.

    Raises ArchitectureError for a recognised but unsupported family (SD3, Flux) and for a model
    no spec matches.
    """
    for spec in ARCHITECTURES:
        if spec.matches(shapes):
            if not spec.supported:
                raise ArchitectureError(
                    f"{spec.display_name} models are not supported yet: closed-form erasure needs "
                    "UNet cross-attention (SD1.x, SD2.x or SDXL), but got a "
                    f"{spec.display_name} model. Connect an SD1.x, SD2.x or SDXL checkpoint.",
                    input_name="model",
                )
            return spec
    tried = ", ".join(s.name for s in ARCHITECTURES)
    raise ArchitectureError(
        f"unknown architecture: expected a model whose weight keys match one of ({tried}), but "
        "none matched. Connect an SD1.x, SD2.x or SDXL model, or open an issue with the model name.",
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


def reference_site_shapes(name: str, prefix: str = "diffusion_model.") -> dict[str, tuple[int, int]]:
    """Key -> shape of every K/V site of the full-size model ``name`` (``sd1``, ``sd2``, ``sdxl``),
    plus its marker keys, so that :func:`detect` recognises the result."""
    spec = next((s for s in ARCHITECTURES if s.name == name), None)
    if spec is None or name not in _REFERENCE_BLOCKS:
        raise ArchitectureError(
            f"no reference layout for '{name}'; expected one of {sorted(_REFERENCE_BLOCKS)}.",
            input_name="architecture",
        )
    assert spec.context_dim is not None  # supported specs always have a width
    shapes: dict[str, tuple[int, int]] = {f"{prefix}input_blocks.0.0.weight": (320, 4)}
    if spec.requires:
        shapes[f"{prefix}label_emb.0.0.weight"] = (1280, 2816)
    for block, width, depth in _REFERENCE_BLOCKS[name]:
        for i in range(depth):
            for proj in ("k", "v"):
                key = f"{prefix}{block}.transformer_blocks.{i}.attn2.to_{proj}.weight"
                shapes[key] = (width, spec.context_dim)
    return shapes
