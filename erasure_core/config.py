"""Config helpers: every option carries its help text and range, the single source for node
widgets, tooltips and error messages."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any

from .errors import ConfigError

__all__ = ["option", "option_meta", "validate_ranges"]


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           step: float | None = None) -> Any:
    """A dataclass field with ``metadata={"help", "min", "max", "step"}``."""
    meta = {"help": help, "min": min, "max": max, "step": step}
    return dataclasses.field(default=default, metadata=meta)


def option_meta(config_cls: type, name: str) -> dict[str, Any]:
    """Default, help, range and type of one config field, for building a widget."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return {"default": f.default, "type": f.type, **f.metadata}
    raise KeyError(f"{config_cls.__name__} has no option '{name}'")


def validate_ranges(config: Any) -> None:
    """Raise ConfigError for a value outside its field's [min, max] or of the wrong kind."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(f.default, Enum):
            try:
                object.__setattr__(config, f.name, type(f.default)(value))
            except ValueError:
                allowed = ", ".join(repr(m.value) for m in type(f.default))
                raise ConfigError(
                    f"'{f.name}' must be one of {allowed}, but got {value!r}. Pick one of the listed values.",
                    input_name=f.name,
                ) from None
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):  # NaN passes both comparisons below
            raise ConfigError(f"'{f.name}' must be a finite number, but got {value}. Type a number "
                              f"(the default is {f.default}).", input_name=f.name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(
                f"'{f.name}' must be between {lo} and {hi}, but got {value}. "
                f"{f.metadata.get('help', '')}".strip(),
                input_name=f.name,
            )
