"""Concept erasure for text-to-image diffusion models, in pure torch.

This package never imports ComfyUI. ``nodes/`` adapts it to ComfyUI; the CLI
(``python -m erasure_core``) and the benchmarks call it directly.
"""

from __future__ import annotations

__version__ = "0.1.0"

from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from . import methods  # noqa: E402
from .architectures import (  # noqa: E402
    ARCHITECTURES,
    ArchSpec,
    AttentionSite,
    LazyWeight,
    detect,
    reference_site_shapes,
)
from .concepts import Concept, ConceptKind, ConceptSet, parse_anchor_list, parse_concept_list  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureError,
    ConceptError,
    ConfigError,
    ErasureError,
    NumericalError,
    PatchError,
)
from .methods.closed_form import ClosedFormConfig, Progress, SolveDtype  # noqa: E402
from .patch import PatchEntry, PatchSet  # noqa: E402
from .text import EncodedText, TextEncoder, TokenPick  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ArchitectureError",
    "AttentionSite",
    "ClosedFormConfig",
    "Concept",
    "ConceptKind",
    "ConceptError",
    "ConceptSet",
    "ConfigError",
    "EncodedText",
    "LazyWeight",
    "ErasureError",
    "NumericalError",
    "PatchEntry",
    "PatchError",
    "PatchSet",
    "Progress",
    "SolveDtype",
    "TextEncoder",
    "TokenPick",
    "__version__",
    "detect",
    "erase",
    "make_config",
    "methods",
    "parse_anchor_list",
    "parse_concept_list",
    "reference_site_shapes",
]


def make_config(method: str, **values: Any) -> Any:
    """Build ``method``'s config from option values (unknown names raise ConfigError)."""
    spec = methods.get(method)
    try:
        return spec.config_cls(**values)
    except TypeError as exc:
        raise ConfigError(
            f"{method} options must be fields of {spec.config_cls.__name__}, but {exc}.",
            input_name="method",
        ) from None


def erase(
    method: str,
    sites: Sequence[AttentionSite],
    concepts: ConceptSet,
    encoder: TextEncoder,
    config: Any = None,
    *,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> PatchSet:
    """Run a registered weight-editing method and return its PatchSet."""
    spec = methods.get(method)
    if config is not None and not isinstance(config, spec.config_cls):
        raise ConfigError(
            f"{method} needs a {spec.config_cls.__name__}, but got {type(config).__name__}.",
            input_name="method",
        )
    return spec.solve(sites, concepts.require_targets(), encoder, config, device=device, progress=progress)
