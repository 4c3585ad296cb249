"""Method registry: ``name -> (Config dataclass, solve function)``.

Adding a method means one module under ``methods/`` and one ``register`` call; nothing else
changes. Nodes build their method combo and widgets from this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["Method", "get", "names", "register"]


@dataclass(frozen=True)
class Method:
    """A registered method. ``presets`` are the paper's named option sets; ``node_widgets`` says
    whether Closed-Form Erase's own widgets (UCE's options) mean the same for this method."""

    name: str
    config_cls: type
    solve: Callable[..., Any]
    description: str
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    node_widgets: bool = True


_REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type, solve: Callable[..., Any], description: str, *,
             presets: Mapping[str, Mapping[str, Any]] | None = None, node_widgets: bool = True) -> Method:
    """Add a method; a second registration under the same name is refused."""
    if name in _REGISTRY:
        raise ValueError(f"method '{name}' is already registered")
    method = Method(name, config_cls, solve, description, dict(presets or {}), node_widgets)
    _REGISTRY[name] = method
    return method


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"'method' must be one of {names()}, but got {name!r}. Pick a listed method.",
            input_name="method",
        ) from None


def names() -> list[str]:
    return list(_REGISTRY)


from . import uce as _uce  # noqa: E402,F401,I001  (registers the methods, in menu order)
from . import speed as _speed  # noqa: E402,F401
from . import rece as _rece  # noqa: E402,F401
from . import mace as _mace  # noqa: E402,F401
from . import realera as _realera  # noqa: E402,F401
