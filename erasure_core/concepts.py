"""Concepts to erase: targets, the anchors they map to, and concepts to preserve.

A *target* is a concept to erase ("Van Gogh"), its *anchor* is what the model should produce
instead ("a painter", or ``""`` to erase toward nothing), and *preserve* concepts are ones whose
outputs must not move. Templates (``"painting by {}"``) expand each concept into several prompts,
as UCE's ``--expand_prompts`` does (arXiv 2308.14761, code ``uce_sd_erase.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConceptError

__all__ = ["ConceptSet", "parse_anchor_list", "parse_concept_list"]

_SEPARATORS = re.compile(r"[;\n]")


def parse_concept_list(text: str | None) -> tuple[str, ...]:
    """Split user text into concepts: one per line or separated by ``;``.

    Surrounding whitespace is stripped, blank entries and ``#`` comment lines are dropped, and
    repeats are kept once (first occurrence wins, compared case-insensitively). Commas are *not*
    separators, because a concept may itself be a phrase ("a cat, sitting").
    """
    if not text:
        return ()
    seen: set[str] = set()
    out: list[str] = []
    for raw in _SEPARATORS.split(text):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        key = _normalise(item)
        if key in seen:
            continue
        seen.add(key)
        out.append(item)
    return tuple(out)


def parse_anchor_list(text: str | None) -> tuple[str, ...]:
    """Split anchors like :func:`parse_concept_list`, but keep repeats (anchors pair by position).

    An entry that is exactly ``""`` or ``''`` means "erase toward nothing" (the empty prompt).
    """
    if not text:
        return ()
    out = []
    for raw in _SEPARATORS.split(text):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        out.append("" if item in ('""', "''") else item)
    return tuple(out)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class ConceptSet:
    """Validated concepts for one erasure.

    ``anchors`` holds one entry per target after construction (a single anchor is broadcast);
    ``""`` means "erase toward nothing". ``templates`` each contain one ``{}``; ``("{}",)`` means
    the concept strings are used as they are.
    """

    targets: tuple[str, ...]
    anchors: tuple[str, ...] = ("",)
    preserve: tuple[str, ...] = ()
    templates: tuple[str, ...] = ("{}",)

    def __post_init__(self) -> None:
        targets = tuple(t.strip() for t in self.targets)
        if not targets or any(not t for t in targets):
            raise ConceptError(
                "needs at least one concept to erase, but got none. Type the concepts to erase, "
                "one per line or separated by ';'.",
                input_name="targets",
            )
        anchors = tuple(a.strip() for a in (self.anchors or ("",)))
        if len(anchors) == 1:
            anchors = anchors * len(targets)
        elif len(anchors) != len(targets):
            raise ConceptError(
                f"anchors must have 1 entry or one per target ({len(targets)}), but got "
                f"{len(anchors)}. Give a single anchor for all targets, or one anchor per target "
                "in the same order, one per line or separated by ';'.",
                input_name="anchors",
            )
        for target, anchor in zip(targets, anchors, strict=True):
            if _normalise(target) == _normalise(anchor):
                raise ConceptError(
                    f"each target must differ from its anchor, but target '{target}' has anchor "
                    f"'{anchor}'. Pick an anchor that names what should appear instead (for "
                    "example a broader concept), or leave anchors empty to erase toward nothing.",
                    input_name="anchors",
                )
        target_keys = {_normalise(t) for t in targets}
        clash = [p for p in self.preserve if _normalise(p) in target_keys]
        if clash:
            raise ConceptError(
                f"a concept cannot be both erased and preserved, but got {clash!r} in both. "
                "Remove it from the preserve list or from the targets.",
                input_name="preserve",
            )
        templates = tuple(self.templates) or ("{}",)
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ConceptError(
                f"each template must contain '{{}}' exactly once, but got {bad!r}. Write templates "
                "like 'painting by {}'.",
                input_name="templates",
            )
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "anchors", anchors)
        object.__setattr__(self, "preserve", tuple(p.strip() for p in self.preserve if p.strip()))
        object.__setattr__(self, "templates", templates)

    @classmethod
    def from_text(cls, targets: str, anchors: str = "", preserve: str = "") -> ConceptSet:
        """Build a ConceptSet from the multiline text a user types (see :func:`parse_concept_list`)."""
        return cls(
            targets=parse_concept_list(targets),
            anchors=parse_anchor_list(anchors) or ("",),
            preserve=parse_concept_list(preserve),
        )

    def erase_pairs(self) -> list[tuple[str, str]]:
        """(target prompt, anchor prompt) for every target and template.

        An empty anchor stays empty under every template: it stands for the null prompt.
        """
        pairs = []
        for target, anchor in zip(self.targets, self.anchors, strict=True):
            for template in self.templates:
                pairs.append((template.format(target), template.format(anchor) if anchor else ""))
        return pairs

    def preserve_prompts(self, extra: Iterable[str] = ()) -> list[str]:
        """Every preserve concept under every template, plus ``extra`` prompts, without repeats."""
        prompts = [t.format(p) for p in self.preserve for t in self.templates]
        return _unique([*prompts, *extra])

    def describe(self) -> dict[str, object]:
        """Plain data for a PatchSet's metadata and the node report."""
        return {
            "targets": list(self.targets),
            "anchors": list(self.anchors),
            "preserve": list(self.preserve),
            "templates": list(self.templates),
        }


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))
