"""Small helpers shared by the node modules: widgets from core config fields, and the one wrapper
at the node boundary (:func:`guard_node`) through which every node's ``execute`` and
``validate_inputs`` run."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from enum import Enum
from typing import Any

from ..erasure_core.config import option_meta
from ..erasure_core.errors import ConfigError, ErasureError, shown
from .types import io

logger = logging.getLogger(__name__)


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


def validation_message(display_name: str, check: Callable[[], object]) -> bool | str:
    """Run ``check``; return True, or the error text naming the node (for validate_inputs)."""
    try:
        check()
    except ErasureError as err:
        return str(err.for_node(display_name))
    return True


# ComfyUI's own exceptions (Cancel, out of memory) must reach its executor unchanged: it handles them.
_PASS_THROUGH_MODULES = ("comfy", "execution", "comfy_execution", "torch")


def _passes_through(err: BaseException) -> bool:
    if isinstance(err, ErasureError):
        return False
    return type(err).__name__ == "InterruptProcessingException" or \
        type(err).__module__.split(".")[0] in _PASS_THROUGH_MODULES


def _as_erasure_error(err: Exception, node: str) -> ErasureError:
    """``err`` as a clear error naming ``node``; an exception the pack did not expect becomes one
    too (with its type and text), so no raw traceback of our code is the user's only clue."""
    if isinstance(err, ErasureError):
        return err.for_node(node)
    logger.exception("Concept erasure: unexpected error in %s", node)
    wrapped = ErasureError(f"failed unexpectedly ({type(err).__name__}: {str(err)[:300]}). Check the inputs; if "
                           "they look right, report this with the workflow (the server log has the details).",
                           node=node)
    wrapped.__cause__ = err
    return wrapped


def _node_name(cls: type) -> str:
    name = getattr(cls, "DISPLAY_NAME", "") or getattr(cls.define_schema(), "display_name", None)
    return name or cls.__name__


def check_widget_values(cls: type, values: dict[str, Any]) -> None:
    """Raise ConfigError naming the input for a widget value ComfyUI let through: a combo value
    outside its list (the HTTP API can send any string, and ComfyUI skips its own check for inputs
    a ``validate_inputs`` takes), a float that is not finite (NaN passes ComfyUI's range check)
    or a number outside its range."""
    for spec in cls.define_schema().inputs:
        name = getattr(spec, "id", None)
        if name not in values or values[name] is None:
            continue
        value = values[name]
        if isinstance(spec, io.Combo.Input):
            options = getattr(spec, "options", None)
            if options and not any(value == o and isinstance(value, type(o)) for o in options):
                listed = ", ".join(repr(o) for o in options[:8]) + (", ..." if len(options) > 8 else "")
                raise ConfigError(f"must be one of the listed values ({listed}), but got {shown(value)}. "
                                  "Pick a value from the list (refresh with R if a file is missing).",
                                  input_name=name)
        elif isinstance(spec, (io.Float.Input, io.Int.Input)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"must be a number, but got {shown(value)}. Type a number.", input_name=name)
            if not math.isfinite(value):
                raise ConfigError(f"must be a finite number, but got {value}. Type a number "
                                  f"(the default is {getattr(spec, 'default', None)}).", input_name=name)
            lo, hi = getattr(spec, "min", None), getattr(spec, "max", None)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(f"must be between {lo} and {hi}, but got {value}. Type a value in that range.",
                                  input_name=name)
        elif isinstance(spec, io.Boolean.Input) and not isinstance(value, bool):
            raise ConfigError(f"must be true or false, but got {shown(value)}.", input_name=name)
        elif isinstance(spec, io.String.Input) and not isinstance(value, str):
            raise ConfigError(f"must be text, but got {shown(value)}.", input_name=name)


def _bound_values(signature: inspect.Signature, cls: type, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        bound = signature.bind_partial(cls, *args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    values: dict[str, Any] = {}
    for key, value in bound.items():
        if isinstance(value, dict) and key not in kwargs and \
                signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        else:
            values[key] = value
    return values


def guard_node(cls: type) -> type:
    """Route ``cls.execute`` and ``cls.validate_inputs`` through the node boundary: widget values
    are checked first (:func:`check_widget_values`), and every exception of ours leaves as an
    ErasureError naming the node (``execute``) or as the error text (``validate_inputs``). Applied
    to every node in ``nodes.NODES``, so a new code path cannot leak a raw traceback. Idempotent."""
    for method in ("execute", "validate_inputs"):
        raw = inspect.getattr_static(cls, method, None)
        fn = getattr(raw, "__func__", None)
        if fn is None or getattr(fn, "_ce_guarded", None) is cls or fn.__module__.startswith("comfy_api"):
            continue  # ComfyUI's placeholder (it raises NotImplementedError) must stay unoverridden
        fn = getattr(fn, "_ce_inner", fn)
        setattr(cls, method, classmethod(_guarded(fn, method == "validate_inputs", cls)))
    return cls


def _guarded(fn: Callable[..., Any], validating: bool, owner: type) -> Callable[..., Any]:
    signature = inspect.signature(fn)  # read once, not on every call

    @functools.wraps(fn)
    def inner(cls: type, *args: Any, **kwargs: Any) -> Any:
        try:
            check_widget_values(cls, _bound_values(signature, cls, args, kwargs))
            return fn(cls, *args, **kwargs)
        except Exception as err:
            if _passes_through(err):
                raise
            error = _as_erasure_error(err, _node_name(cls))
            if validating:
                return str(error)
            raise error from err.__cause__ if isinstance(err, ErasureError) else err

    inner.__signature__ = signature  # ComfyUI reads validate_inputs' argument names
    inner._ce_guarded = owner
    inner._ce_inner = fn
    return inner
