"""Concept erasure for text-to-image diffusion models, in pure torch.

This package never imports ComfyUI. ``nodes/`` adapts it to ComfyUI; the CLI
(``python -m erasure_core``) and the benchmarks call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from . import methods  # noqa: E402
from .architectures import (  # noqa: E402
    ARCHITECTURES,
    ArchSpec,
    AttentionSite,
    LazyWeight,
    RowNorm,
    RowTransform,
    TextInput,
    detect,
    reference_site_shapes,
    supported_families,
)
from .concept_text import parse_anchor_list, parse_concept_list  # noqa: E402
from .concepts import Concept, ConceptKind, ConceptSet  # noqa: E402
from .edit.patch import PatchEntry, PatchSet  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureError,
    ConceptError,
    ConfigError,
    ErasureError,
    NumericalError,
    PatchError,
)
from .methods.closed_form import ClosedFormConfig, Progress, SolveDtype  # noqa: E402
from .methods.streams import solve_by_stream  # noqa: E402
from .text.encoded import EncodedText, TextEncoder, TokenPick  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ArchitectureError",
    "AttentionSite",
    "ClosedFormConfig",
    "Concept",
    "ConceptKind",
    "ConceptError",
    "CUSTOM_PRESET",
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
    "node_config",
    "methods",
    "parse_anchor_list",
    "parse_concept_list",
    "reference_site_shapes",
    "RowNorm",
    "RowTransform",
    "TextInput",
    "supported_families",
]


CUSTOM_PRESET = "custom"


def make_config(method: str, preset: str = CUSTOM_PRESET, **values: Any) -> Any:
    """Build ``method``'s config from option values (unknown names raise ConfigError).

    A named ``preset`` (the paper's settings, e.g. SPEED's ``multi-celebrity``) overrides the
    values it names; ``custom`` uses ``values`` as given.
    """
    spec = methods.get(method)
    if preset != CUSTOM_PRESET:
        if preset not in spec.presets:
            raise ConfigError(f"preset must be one of {[CUSTOM_PRESET, *spec.presets]}, but got {preset!r}.",
                              input_name="preset")
        values = values | dict(spec.presets[preset])
    try:
        return spec.config_cls(**values)
    except TypeError as exc:
        raise ConfigError(
            f"{method} options must be fields of {spec.config_cls.__name__}, but {exc}.",
            input_name="method",
        ) from None


def node_config(method: str, widget_values: dict[str, Any], options: Any = None) -> tuple[Any, str]:
    """The config Closed-Form Erase runs with, and a line saying where it came from.

    An options node's config wins (it must be for ``method``); otherwise the node's widgets,
    when they mean the same for this method, else the method's paper defaults.
    """
    spec = methods.get(method)
    if options is not None:
        if not isinstance(options, spec.config_cls):
            raise ConfigError(
                f"options must be for the chosen method '{method}', but they are a "
                f"{type(options).__name__}. Connect the matching options node or change 'method'.",
                input_name="options")
        return options, "options from the connected options node"
    if spec.node_widgets:
        return make_config(method, **widget_values), "the node's options"
    return spec.config_cls(), (f"{method} paper defaults (the node's UCE options do not apply; connect "
                               f"its options node to change them)")


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
    return solve_by_stream(spec.solve, sites, concepts.require_targets(), encoder, config, device=device,
                           progress=progress)
