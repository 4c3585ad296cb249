"""Errors raised by the erasure core.

Every message follows one shape: ``<what> <expected> but got <actual>. <how to fix>``.
The core does not know which ComfyUI node called it; a node adapter attaches its name with
:meth:`ErasureError.for_node`, so the message the user reads names the node, the input, what was
expected and how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "KEY_CHARS",
    "SHOWN_CHARS",
    "ArchitectureError",
    "ConceptError",
    "ConfigError",
    "ErasureError",
    "NumericalError",
    "PatchError",
    "shown",
    "shown_list",
]

SHOWN_CHARS = 60
"""Most characters of a user's or a file's text that a message quotes (then an ellipsis)."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting text a user typed or a file holds
    in a message: a huge value is cut before ``repr`` copies it whole."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
        text = repr(value)
        return text[:-1] + "..." + text[-1]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


KEY_CHARS = 120
"""Most characters of a weight key a message quotes (``shown(key, KEY_CHARS)``): whole real keys
(kohya SDXL names reach ~90) stay readable, a forged megabyte key does not reach the user."""


def shown_list(items: Sequence[Any], most: int = 5, show: Callable[[Any], str] = str) -> str:
    """The first ``most`` of ``items``, each written by ``show`` (e.g. :func:`shown`), joined with
    commas, then how many more there are: only the items shown are formatted."""
    head = ", ".join(show(item) for item in items[:most])
    return head + (f" and {len(items) - most:,} more" if len(items) > most else "")


class ErasureError(ValueError):
    """Base class of every error the core raises on bad input or a failed computation.

    ``input_name`` is the name of the node input (or config field) the user should change, when
    one is to blame. ``node`` is filled in by the node adapter.
    """

    def __init__(self, message: str, *, input_name: str | None = None, node: str | None = None):
        super().__init__(message)
        self.message = message
        self.input_name = input_name
        self.node = node

    def for_node(self, node: str) -> ErasureError:
        """Return a copy of this error that names ``node`` (for example ``"Load Concepts"``)."""
        err = type(self)(self.message, input_name=self.input_name, node=node)
        err.__cause__ = self.__cause__
        return err

    def __str__(self) -> str:
        where = []
        if self.node:
            where.append(self.node)
        if self.input_name:
            where.append(f"input '{self.input_name}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ConfigError(ErasureError):
    """A method option is out of range or contradicts another option."""


class ConceptError(ErasureError):
    """The concepts to erase, their anchors or the preserve set are unusable."""


class ArchitectureError(ErasureError):
    """The model (or its text encoder) is not one the core can edit."""


class NumericalError(ErasureError):
    """A solve produced non-finite values or was singular."""


class PatchError(ErasureError):
    """A PatchSet is malformed, or does not fit the model it is applied to."""
