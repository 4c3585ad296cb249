"""Method registry: ``name -> (Config dataclass, solve function)``.

Adding a method means one module under ``methods/`` and one ``register`` call; nothing else
changes. Nodes build their method combo and widgets from this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["Method", "get", "names", "register"]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    solve: Callable[..., Any]
    description: str


_REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type, solve: Callable[..., Any], description: str) -> Method:
    """Add a method; a second registration under the same name is refused."""
    if name in _REGISTRY:
        raise ValueError(f"method '{name}' is already registered")
    method = Method(name, config_cls, solve, description)
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


from . import uce as _uce  # noqa: E402,F401  (registers the method)
