"""Concepts to erase: targets with their anchors and aliases, and concepts to preserve.

A *target* is a concept to erase ("Vincent van Gogh"); its *aliases* ("Van Gogh") are erased
together toward the same *anchor* ("a painter", or ``""`` to erase toward nothing); *preserve*
concepts must keep their outputs. Templates ("a painting by {}") expand every name into several
prompts, per kind, as UCE's ``--expand_prompts`` does (arXiv 2308.14761, ``uce_sd_erase.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from .concept_text import (
    MAX_NAME_CHARS,
    broadcast_anchors,
    check_name,
    fill_template,
    normalise,
    parse_anchor_list,
    parse_concept_list,
)
from .errors import ConceptError, shown, shown_list

__all__ = [
    "BUILTIN_TEMPLATES",
    "Concept",
    "ConceptKind",
    "ConceptSet",
    "MAX_PROMPTS",
    "check_prompt_lengths",
]

ANY_KIND = "*"

MAX_PROMPTS = 20_000
"""Most erase prompts (every target name and alias under each template of its kind) one concept
set expands to, and separately most preserve prompts. Counted (names x templates) before any
prompt is built or tokenised: typed text and files are capped in characters, but their product
is not (8,000 names under 8,000 custom templates would be 64 million prompts, built and
tokenised at queue time). Papers erase up to about 1,000 concepts with a few templates each
(UCE's 1,000 artists under its 6 art templates: 6,000; with two aliases each, 18,000) and keep
hundreds to a few thousand; the largest preset here expands to 672 erase prompts and the largest
preserve set to 3,720 (built-in templates). Load Concepts checks the worst case, 20,000 of each,
at queue time in about 0.7 s (real ComfyUI, token counts and embedding look-ups)."""

CLASHES_SHOWN = 5
"""Concepts both erased and preserved that the error names (then a count), so that two long lists
that overlap give a readable message."""

WARNINGS_KEPT = 5
"""Warnings a concept set keeps (the rest are only counted): each is a line on the node, and a
file that repeats one name 100,000 times must not send (or format) 100,000 lines."""



class ConceptKind(str, Enum):
    """What a concept is; it selects the built-in templates."""

    GENERIC = "generic"
    ARTIST = "artist"
    CELEBRITY = "celebrity"
    OBJECT = "object"
    CHARACTER = "character"
    EXPLICIT = "explicit"


# The paper's art and object templates (UCE uce_sd_erase.py), plus ours for the other kinds.
BUILTIN_TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    ConceptKind.ARTIST.value: ("{}", "painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    ConceptKind.OBJECT.value: ("{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
    ConceptKind.CELEBRITY.value: ("{}", "a photo of {}", "a portrait of {}", "an image of {}", "{} on the red carpet"),
    ConceptKind.CHARACTER.value: ("{}", "an image of {}", "a drawing of {}", "a cartoon of {}", "a toy of {}"),
    ConceptKind.EXPLICIT.value: ("{}", "a photo of {}", "an image of {}"),
    ConceptKind.GENERIC.value: ("{}", "an image of {}", "a photo of {}", "a painting of {}"),
})


@dataclass(frozen=True)
class Concept:
    """One named concept: its aliases, the anchor it maps to (targets only) and its kind."""

    name: str
    anchor: str = ""
    aliases: tuple[str, ...] = ()
    kind: ConceptKind = ConceptKind.GENERIC

    def __post_init__(self) -> None:
        name = " ".join(self.name.split())
        check_name(name, "concept name", "targets")
        for alias in self.aliases:
            check_name(" ".join(alias.split()), "alias", "targets")
        check_name(" ".join(self.anchor.split()), "anchor", "anchors")
        if not name:
            raise ConceptError("every concept needs a name, but got an empty one. Remove the empty "
                               "entry.", input_name="targets")
        try:
            kind = ConceptKind(self.kind)
        except ValueError:
            kinds = ", ".join(k.value for k in ConceptKind)
            raise ConceptError(f"kind must be one of {kinds}, but got {shown(self.kind)} for {shown(name)}. "
                               "Use one of the listed kinds.", input_name="kind") from None
        seen = {normalise(name)}
        aliases = []
        for alias in (" ".join(a.split()) for a in self.aliases):
            if alias and normalise(alias) not in seen:  # CLIP lower-cases: one prompt per spelling
                seen.add(normalise(alias))
                aliases.append(alias)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "anchor", " ".join(self.anchor.split()))
        object.__setattr__(self, "aliases", tuple(aliases))
        object.__setattr__(self, "kind", kind)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def to_dict(self, with_anchor: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if with_anchor:
            out["anchor"] = self.anchor
        if self.aliases:
            out["aliases"] = list(self.aliases)
        out["kind"] = self.kind.value
        return out


def _as_concept(item: Concept | str) -> Concept:
    return item if isinstance(item, Concept) else Concept(item)


class _Folder:
    """Entries folded by shared names: each later entry sharing a name (or alias) with an earlier
    one gives its names to it as aliases. ``on_conflict(first, item)`` runs when their anchors
    differ. The aliases are collected and each concept built once at the end: rebuilding it per
    fold was quadratic (4,000 lines 'Dali | alias' took 9 s, at queue time)."""

    def __init__(self, on_conflict: Callable[[Concept, Concept], None]):
        self.on_conflict = on_conflict
        self.firsts: list[Concept] = []
        self.more: list[list[str]] = []
        self.index: dict[str, int] = {}

    def add(self, item: Concept) -> bool:
        """Append ``item``, or fold it into the entry sharing a name; True if folded."""
        hit = next((self.index[normalise(n)] for n in item.names if normalise(n) in self.index), None)
        if hit is None:
            self.index.update({normalise(n): len(self.firsts) for n in item.names})
            self.firsts.append(item)
            self.more.append([])
            return False
        first = self.firsts[hit]
        if normalise(first.anchor) != normalise(item.anchor):
            self.on_conflict(first, item)
        self.more[hit] += item.names
        self.index.update({normalise(n): hit for n in item.names})
        return True

    def first_name(self, name: str) -> str:
        """The name of the entry that ``name`` was folded into."""
        return self.firsts[self.index[normalise(name)]].name

    def concepts(self) -> tuple[Concept, ...]:
        return tuple(replace(c, aliases=c.aliases + tuple(more)) if more else c
                     for c, more in zip(self.firsts, self.more, strict=True))


class _Warnings:
    """The first :data:`WARNINGS_KEPT` warnings, and how many more there were (a repeat of a kept
    one among them): those are counted, never formatted, so a list repeating one name 100,000
    times formats five strings."""

    def __init__(self, kept: Iterable[str] = (), left_out: int = 0):
        self.kept: list[str] = []
        self.left_out = left_out
        self._made = 0
        for text in kept:
            self.add(lambda text=text: text)

    def add(self, make: Callable[[], str]) -> None:
        if self._made >= WARNINGS_KEPT:
            self.left_out += 1
            return
        self._made += 1
        text = make()
        if text in self.kept:
            self.left_out += 1
        else:
            self.kept.append(text)


def _merge_duplicates(items: Iterable[Concept], role: str, warnings: _Warnings) -> tuple[Concept, ...]:
    """Fold entries whose names (or aliases) coincide into the first one, with a warning.

    Two targets that share a name but map to different anchors cannot both hold: that raises.
    """

    def refuse(first: Concept, item: Concept) -> None:
        raise ConceptError(
            f"a target can map to one anchor only, but {shown(item.name)} maps to {shown(first.anchor)} "
            f"and to {shown(item.anchor)}. Keep one of the two entries.", input_name="anchors")

    folder = _Folder(refuse if role == "targets" else lambda a, b: None)
    for item in items:
        if folder.add(item):
            warnings.add(lambda item=item: f"{shown(item.name)} is listed twice in {role}; merged into "
                                           f"{shown(folder.first_name(item.name))}.")
    return folder.concepts()


@dataclass(frozen=True)
class ConceptSet:
    """Validated concepts for one erasure (the ``CE_CONCEPTS`` socket value).

    ``templates`` maps a kind (or ``"*"`` for every kind) to prompt templates, each containing
    ``{}`` once; kinds without templates use the names as they are. ``warnings`` records what was
    merged or dropped on the way (shown on the node): the first :data:`WARNINGS_KEPT`, and
    ``warnings_left_out`` counts the rest.
    """

    targets: tuple[Concept, ...] = ()
    preserve: tuple[Concept, ...] = ()
    templates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    warnings_left_out: int = 0

    def __post_init__(self) -> None:
        warnings = _Warnings(self.warnings, self.warnings_left_out)
        targets = _merge_duplicates((_as_concept(t) for t in self.targets), "targets", warnings)
        for t in targets:
            if t.anchor and any(normalise(n) == normalise(t.anchor) for n in t.names):
                raise ConceptError(
                    f"each target must differ from its anchor, but target {shown(t.name)} has anchor "
                    f"{shown(t.anchor)}. Pick an anchor that names what should appear instead (for "
                    "example a broader concept), or leave it empty to erase toward nothing.",
                    input_name="anchors",
                )
        preserve = _merge_duplicates((_as_concept(p) for p in self.preserve), "preserve", warnings)
        erased = {normalise(n): t.name for t in targets for n in t.names}
        clash = [n for p in preserve for n in p.names if normalise(n) in erased]
        if clash:  # only the names shown are formatted (an overlap may be 100,000 long); the rest counted
            named = shown_list(clash, CLASHES_SHOWN, show=lambda n: f"{shown(n)} (target {shown(erased[normalise(n)])})")
            raise ConceptError(
                f"a concept cannot be both erased and preserved, but {named} "
                f"{'is' if len(clash) == 1 else 'are'} in both. Remove "
                f"{'it' if len(clash) == 1 else 'them'} from the preserve list or from the targets.",
                input_name="preserve",
            )
        templates = _check_templates(self.templates)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "preserve", preserve)
        object.__setattr__(self, "templates", MappingProxyType(templates))
        object.__setattr__(self, "warnings", tuple(warnings.kept))
        object.__setattr__(self, "warnings_left_out", warnings.left_out)

    def require_targets(self) -> ConceptSet:
        """This set, or ConceptError when it has nothing to erase (sets may be built empty and
        merged; an erasure needs at least one target)."""
        if not self.targets:
            raise ConceptError(
                "needs at least one concept to erase, but got none. Type the concepts to erase, "
                "one per line or separated by ';', or pick a preset or a file.",
                input_name="targets",
            )
        return self

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def simple(cls, targets: Sequence[str], anchors: Sequence[str] = ("",), preserve: Sequence[str] = (),
               templates: Sequence[str] = ()) -> ConceptSet:
        """Targets paired with anchors by position (one anchor is broadcast to every target)."""
        anchors = broadcast_anchors(anchors, len(targets), "one per target",
                                    "Give a single anchor for all targets, or one anchor per target in the same "
                                    "order, one per line or separated by ';'.")
        return cls(tuple(Concept(t, a) for t, a in zip(targets, anchors, strict=True)),
                   tuple(Concept(p) for p in preserve),
                   {ANY_KIND: tuple(templates)} if templates else {}).require_targets()

    @classmethod
    def from_text(cls, targets: str, anchors: str = "", preserve: str = "") -> ConceptSet:
        """Build from the multiline text a user types (see :func:`parse_concept_list`)."""
        return cls.simple(parse_concept_list(targets), parse_anchor_list(anchors) or ("",),
                          parse_concept_list(preserve))

    def merged(self, other: ConceptSet, check: bool = True) -> ConceptSet:
        """Union of two sets; on conflicts ``self`` wins and each conflict becomes a warning.

        A target of one set that the other maps to a different anchor keeps this set's anchor;
        a concept one set erases and the other preserves is erased (dropped from preserve).
        Two sets under :data:`MAX_PROMPTS` may exceed it together: ``check`` refuses that (a
        caller that attributes the error itself, or changes the templates next, passes False).
        """
        warnings = _Warnings((*self.warnings, *other.warnings), self.warnings_left_out + other.warnings_left_out)

        def keep_first(first: Concept, item: Concept) -> None:
            warnings.add(lambda: f"{shown(item.name)} maps to {shown(first.anchor)} in the first input and to "
                                 f"{shown(item.anchor)} in the second; kept {shown(first.anchor)}.")

        folder = _Folder(keep_first)
        for t in (*self.targets, *other.targets):
            folder.add(t)
        targets = folder.concepts()
        erased = {normalise(n) for t in targets for n in t.names}
        preserve, kept = [], set()
        for p in (*self.preserve, *other.preserve):
            if normalise(p.name) in kept:
                continue  # the same concept preserved by both inputs
            kept.add(normalise(p.name))
            if any(normalise(n) in erased for n in p.names):
                warnings.add(lambda p=p: f"{shown(p.name)} is erased by one input and preserved by the other; "
                                         "it is erased (removed from preserve).")
            else:
                preserve.append(p)
        templates = {**other.templates, **self.templates}
        out = ConceptSet(tuple(targets), tuple(preserve), templates, tuple(warnings.kept), warnings.left_out)
        return out.check_prompt_count() if check else out

    # -- views ---------------------------------------------------------------------------------
    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    @property
    def anchors(self) -> tuple[str, ...]:
        return tuple(t.anchor for t in self.targets)

    def templates_for(self, kind: ConceptKind) -> tuple[str, ...]:
        return self.templates.get(kind.value) or self.templates.get(ANY_KIND) or ("{}",)

    def prompt_count(self, role: str) -> tuple[int, int]:
        """``(names, prompts)`` of ``role`` (``"targets"`` or ``"preserve"``): its names and aliases,
        and the prompts they expand to under their kinds' templates (an upper bound: repeats are
        not removed), counted without building any prompt."""
        names = prompts = 0
        for concept in self.targets if role == "targets" else self.preserve:
            names += len(concept.names)
            prompts += len(concept.names) * len(self.templates_for(concept.kind))
        return names, prompts

    def check_prompt_count(self, targets_input: str = "targets", preserve_input: str = "preserve") -> ConceptSet:
        """This set, or ConceptError when its erase or its preserve prompts would number more than
        :data:`MAX_PROMPTS`, naming ``targets_input`` or ``preserve_input``."""
        self._check_role("targets", targets_input)
        self._check_role("preserve", preserve_input)
        return self

    def _check_role(self, role: str, input_name: str) -> None:
        names, prompts = self.prompt_count(role)
        if prompts <= MAX_PROMPTS:
            return
        concepts = self.targets if role == "targets" else self.preserve
        most = max(len(self.templates_for(kind)) for kind in {c.kind for c in concepts})
        what, fix = (("erase prompts (each target name and alias under each template of its kind)",
                      "Use fewer templates ('none', or fewer custom templates), or erase fewer targets at "
                      "once and erase the rest in a second, chained erasure.") if role == "targets" else
                     ("preserve prompts (each preserved name and alias under each template of its kind)",
                      "Use fewer templates ('none', or fewer custom templates), or preserve fewer concepts "
                      "(the closest neighbours of the targets matter most)."))
        raise ConceptError(f"{what} must number at most {MAX_PROMPTS:,}, but these concepts make {prompts:,} "
                           f"({names:,} names and aliases under up to {most:,} templates each). {fix}",
                           input_name=input_name)

    def erase_pairs(self) -> list[tuple[str, str]]:
        """(target prompt, anchor prompt) for every target name, alias and template.

        An empty anchor stays empty under every template: it stands for the null prompt. A set
        over :data:`MAX_PROMPTS` is refused before any prompt is built.
        """
        self._check_role("targets", "targets")
        pairs = []
        for t in self.targets:
            for template in self.templates_for(t.kind):
                anchor = fill_template(template, t.anchor) if t.anchor else ""
                pairs.extend((fill_template(template, name), anchor) for name in t.names)
        return list(dict.fromkeys(pairs))

    def preserve_prompts(self, extra: Iterable[str] = ()) -> list[str]:
        """Every preserve name under its kind's templates, plus ``extra`` prompts, once each (a
        set over :data:`MAX_PROMPTS` is refused before any prompt is built)."""
        self._check_role("preserve", "preserve")
        prompts = [fill_template(tpl, n) for p in self.preserve for tpl in self.templates_for(p.kind) for n in p.names]
        return list(dict.fromkeys([*prompts, *extra]))

    def describe(self) -> dict[str, Any]:
        """Plain data (the JSON file format's body), for metadata and files."""
        return {
            "targets": [t.to_dict() for t in self.targets],
            "preserve": [p.to_dict(with_anchor=False) for p in self.preserve],
            "templates": {k: list(v) for k, v in self.templates.items()},
        }

    def summary(self, first: int = 5) -> str:
        """A few lines for the node: counts per kind, the first entries, warnings."""
        kinds: dict[str, int] = {}
        for t in self.targets:
            kinds[t.kind.value] = kinds.get(t.kind.value, 0) + 1
        per_kind = ", ".join(f"{n} {k}" for k, n in kinds.items())
        entries = "; ".join(f"{t.name}{' (+' + str(len(t.aliases)) + ' aliases)' if t.aliases else ''}"
                          f" -> {t.anchor or '(nothing)'}" for t in self.targets[:first])
        more = f"; ... {len(self.targets) - first} more" if len(self.targets) > first else ""
        lines = [f"{len(self.targets)} targets ({per_kind}), {len(self.preserve)} preserved, "
                 f"{len(self.erase_pairs())} erase prompts",
                 f"erase: {entries}{more}"]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.warnings_left_out:
            lines.append(f"warning: ... and {self.warnings_left_out:,} more (duplicates merged, conflicts resolved)")
        return "\n".join(lines)


def _check_templates(templates: Mapping[str, Sequence[str]] | Sequence[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(templates, Mapping):
        templates = {ANY_KIND: tuple(templates)} if templates else {}
    known = {ANY_KIND, *(k.value for k in ConceptKind)}
    out = {}
    for kind, items in templates.items():
        if kind not in known:
            raise ConceptError(f"templates are keyed by kind ({', '.join(sorted(known))}), but got "
                               f"{shown(kind)}. Use one of the listed kinds.", input_name="templates")
        items = tuple(items)
        check_templates(items, "templates")
        if items:
            out[kind] = items
    return out


def check_templates(items: Sequence[str], input_name: str) -> None:
    """Each template holds ``{}`` exactly once and no other brace (``{name}`` or a stray ``{``
    would be a different syntax, not a place for the concept)."""
    bad = [t for t in items if t.count("{}") != 1 or t.replace("{}", "", 1).count("{") or
           t.replace("{}", "", 1).count("}")]
    if bad:
        raise ConceptError(f"each template must contain '{{}}' exactly once and no other braces, but got "
                           f"{shown(bad[0])}. Write templates like 'a painting by {{}}'.", input_name=input_name)
    for t in items:
        if len(t) > MAX_NAME_CHARS:
            check_name(t, "template", input_name)


def check_prompt_lengths(concepts: ConceptSet, count_tokens: Callable[[str], int], limit: int = 75) -> None:
    """Raise ConceptError naming the first prompt (after templating) over ``limit`` tokens, and
    the input it came from (``targets`` for erase prompts and anchors, ``preserve`` otherwise)."""
    erase_prompts = [p for pair in concepts.erase_pairs() for p in pair]
    for input_name, prompts in (("targets", erase_prompts), ("preserve", concepts.preserve_prompts())):
        for prompt in dict.fromkeys(prompts):
            n = count_tokens(prompt)
            if n > limit:
                raise ConceptError(
                    f"every prompt must fit in CLIP's {limit} usable tokens, but {shown(prompt)} is {n} "
                    "tokens long once templated. Shorten the concept or its template.",
                    input_name=input_name,
                )
