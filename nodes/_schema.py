"""Small helpers shared by the node modules: widgets from core config fields, error naming."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from typing import Any

from ..erasure_core import ErasureError
from ..erasure_core.config import option_meta
from .types import io


def config_input(config_cls: type, name: str, **overrides: Any) -> Any:
    """A widget for config field ``name``: default, range and tooltip come from the core."""
    meta = option_meta(config_cls, name) | overrides
    default, tooltip = meta["default"], meta["help"]
    if isinstance(default, Enum):
        return io.Combo.Input(name, options=type(default), default=default, tooltip=tooltip)
    if isinstance(default, bool):
        return io.Boolean.Input(name, default=default, tooltip=tooltip)
    if isinstance(default, int):
        return io.Int.Input(name, default=default, min=meta.get("min"), max=meta.get("max"), tooltip=tooltip)
    return io.Float.Input(name, default=default, min=meta.get("min"), max=meta.get("max"),
                          step=meta.get("step"), tooltip=tooltip)


def names_node(display_name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ErasureErrors raised inside a node method name the node: ``display_name``, or the
    calling class's ``DISPLAY_NAME`` (for a method shared by node variants)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ErasureError as err:
                raise err.for_node(display_name or args[0].DISPLAY_NAME) from err

        return inner

    return wrap


def validation_message(display_name: str, check: Callable[[], object]) -> bool | str:
    """Run ``check``; return True, or the error text naming the node (for validate_inputs)."""
    try:
        check()
    except ErasureError as err:
        return str(err.for_node(display_name))
    return True
