"""Typed concept text: its size limits, names, separators, templates and anchor lists, parsed
before any concept is built (:mod:`erasure_core.concepts` builds them)."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConceptError, shown

__all__ = [
    "MAX_NAME_CHARS",
    "MAX_TEXT_CHARS",
    "broadcast_anchors",
    "check_name",
    "check_text_size",
    "fill_template",
    "normalise",
    "parse_anchor_list",
    "parse_concept_list",
    "split_entries",
]

MAX_TEXT_CHARS = 50_000
"""Longest typed text input (targets, anchors, preserve, custom templates), checked before any
parsing or tokenising: about 2,500 names. Longer lists belong in a concept file."""

MAX_NAME_CHARS = 1000
"""Longest single name, alias, anchor or template: CLIP reads 75 tokens (a few characters each),
which no longer text fits. It also bounds the tokeniser's work per word."""

_SEPARATORS = frozenset(" \t,.;:|-_/\\'\"`~!?*+=<>()[]{}#&^%$@")


def check_text_size(text: str | None, input_name: str) -> None:
    """Refuse typed text over :data:`MAX_TEXT_CHARS` before anything parses or tokenises it
    (queue-time checks run inside ComfyUI's HTTP handler)."""
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise ConceptError(f"must be at most {MAX_TEXT_CHARS:,} characters, but got {len(text):,}. Put a "
                           "long list in a concept file (models/concepts) instead.", input_name=input_name)


def check_name(text: str, what: str, input_name: str) -> None:
    if len(text) > MAX_NAME_CHARS:
        raise ConceptError(f"each {what} must be at most {MAX_NAME_CHARS} characters (CLIP reads 75 tokens), "
                           f"but got one of {len(text):,} ({shown(text)}). Shorten it.", input_name=input_name)
    if text and all(ch in _SEPARATORS for ch in text):
        raise ConceptError(f"each {what} must contain a word, but got {shown(text)} (separators only). Remove "
                           "the stray separator.", input_name=input_name)


def fill_template(template: str, name: str) -> str:
    """``template`` with its one ``{}`` replaced by ``name`` (never ``str.format``: a stray brace
    or a named field must not raise, or read attributes, when a prompt is built)."""
    return template.replace("{}", name, 1)


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used to compare concept names."""
    return " ".join(text.lower().split())


def parse_concept_list(text: str | None) -> tuple[str, ...]:
    """Split user text into names: one per line or separated by ``;``.

    Whitespace is stripped, blank entries and ``#`` comment lines are dropped, and repeats are
    kept once (compared case-insensitively). Commas are *not* separators: a concept may itself be
    a phrase ("a cat, sitting").
    """
    seen: set[str] = set()
    out: list[str] = []
    for item in split_entries(text):
        if normalise(item) not in seen:
            seen.add(normalise(item))
            out.append(item)
    return tuple(out)


def parse_anchor_list(text: str | None) -> tuple[str, ...]:
    """Split anchors like :func:`parse_concept_list`, but keep repeats (anchors pair by position).

    An entry that is exactly ``""`` or ``''`` means "erase toward nothing" (the empty prompt).
    """
    return tuple("" if item in ('""', "''") else item for item in split_entries(text))


def broadcast_anchors(anchors: Sequence[str], count: int, per: str, fix: str) -> tuple[str, ...]:
    """One anchor for each of ``count`` targets: a single anchor is repeated; otherwise the counts
    must match (``per`` and ``fix`` word the error for the caller's syntax)."""
    anchors = tuple(anchors) or ("",)
    if len(anchors) == 1:
        return anchors * count
    if len(anchors) != count:
        raise ConceptError(f"anchors must have 1 entry or {per} ({count}), but got {len(anchors)}. {fix}",
                           input_name="anchors")
    return anchors


def split_entries(text: str | None) -> list[str]:
    """Entries of user text: comments removed per line (``#`` at the start, or `` #`` after
    text), then lines split on ``;``; blanks dropped."""
    out = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        line = line.split(" #", 1)[0]
        out += [item.strip() for item in line.split(";") if item.strip()]
    return out
