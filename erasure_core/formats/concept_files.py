"""Where concepts come from: the inline syntax users type, .txt/.csv/.json files, and presets.

Inline text and .txt files: one entry per line (or separated by ``;``)::

    Vincent van Gogh | Van Gogh | V. van Gogh -> a painter
    Mickey Mouse -> a cartoon mouse
    Claude Monet                 # no arrow: the node's 'anchors' input (typed text) or nothing (files)
    # a comment line

``name | alias | alias`` erases the aliases together with the name; ``-> anchor`` sets the
anchor (``-> ""`` or ``->`` alone erase toward nothing).

CSV: a header row, columns matched case-insensitively: ``target`` (or ``name``), ``anchor``,
``aliases`` (separated by ``|``), ``kind``, ``preserve`` (a concept to keep; may stand alone on a
row). JSON: the versioned format of :func:`to_json` (``"format": "concept_erasure.concepts"``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

from ..atomic import replace_atomically
from ..concept_text import broadcast_anchors, check_text_size, normalise, parse_anchor_list, split_entries
from ..concepts import BUILTIN_TEMPLATES, MAX_PROMPTS, Concept, ConceptKind, ConceptSet, check_templates
from ..errors import ConceptError, shown, shown_list

__all__ = [
    "FILE_EXTENSIONS",
    "TemplateMode",
    "assemble",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "from_json",
    "list_presets",
    "list_preserve_sets",
    "load_concept_file",
    "load_preserve_set",
    "load_preset",
    "parse_inline",
    "parse_preserve",
    "save_json",
    "to_json",
]

FORMAT_NAME = "concept_erasure.concepts"
FORMAT_VERSION = 1
FILE_EXTENSIONS = (".txt", ".csv", ".json")
PRESET_DIR = Path(__file__).parents[1] / "presets"
PRESERVE_SET_DIR = Path(__file__).parents[1] / "preserve_sets"
PRESERVE_SET_KINDS = {"artists": ConceptKind.ARTIST, "celebrities": ConceptKind.CELEBRITY,
                      "instances": ConceptKind.OBJECT}
MAX_FILE_BYTES = 8 * 1024 * 1024
"""Largest concept file read (tens of thousands of names); checked before reading it."""
_ALTERNATION = re.compile(r"\[[^\]]*\|[^\]]*\]")
_TOP_KEYS = {"format", "version", "name", "description", "targets", "preserve", "templates"}


def _split_entry(entry: str, where: str) -> Concept | _NoAnchor:
    _refuse_ambiguous(entry, where, "targets")
    names_part, arrow, anchor = entry.partition("->")
    anchor = anchor.strip()
    if "->" in anchor:
        raise ConceptError(f"{where}: each entry has at most one '->', but got {shown(entry)}. Write "
                           "'target -> anchor' (one arrow) per line.", input_name="targets")
    if anchor in ('""', "''"):
        anchor = ""
    names = [n.strip() for n in names_part.split("|")]
    if not names[0]:
        raise ConceptError(f"{where}: each entry must start with a name, but got {shown(entry)}. Write "
                           "'name | alias -> anchor'.", input_name="targets")
    concept = Concept(names[0], anchor, tuple(names[1:]))
    return concept if arrow else _NoAnchor(concept)


def _refuse_ambiguous(entry: str, where: str, input_name: str) -> None:
    if _ALTERNATION.search(entry):
        raise ConceptError(f"{where}: {shown(entry)} uses ComfyUI's [a|b] alternation, which concepts do not "
                           "read (the '|' would split it into aliases). Write the names as 'a | b' (erased "
                           "together) or on separate lines.", input_name=input_name)


class _NoAnchor:
    """Marks an entry without ``->``: its anchor comes from the anchors input."""

    def __init__(self, concept: Concept):
        self.concept = concept


def parse_inline(text: str, anchors: str = "", kind: ConceptKind | str = ConceptKind.GENERIC,
                 where: str = "targets") -> list[Concept]:
    """Targets from the inline syntax. Entries without ``->`` take their anchor from ``anchors``
    (one for all, or one per such entry in order)."""
    kind = ConceptKind(kind)
    entries = [_split_entry(line, where) for line in split_entries(text)]
    free = [e for e in entries if isinstance(e, _NoAnchor)]
    fill = iter(broadcast_anchors(parse_anchor_list(anchors), len(free), "one per target without '->'",
                                  "Give a single anchor, one per target in the same order, or write "
                                  "'target -> anchor' on the target's line."))
    out = []
    for e in entries:
        concept = Concept(e.concept.name, next(fill), e.concept.aliases) if isinstance(e, _NoAnchor) else e
        out.append(Concept(concept.name, concept.anchor, concept.aliases, kind))
    return out


def parse_preserve(text: str, kind: ConceptKind | str = ConceptKind.GENERIC) -> list[Concept]:
    """Preserve concepts from inline text (``name | alias``; arrows are not allowed)."""
    out = []
    for line in split_entries(text):
        _refuse_ambiguous(line, "preserve", "preserve")
        if "->" in line:
            raise ConceptError(f"preserved concepts have no anchor, but got {shown(line)}. Remove the "
                               "'-> ...' part.", input_name="preserve")
        names = [n.strip() for n in line.split("|")]
        try:
            out.append(Concept(names[0], "", tuple(names[1:]), ConceptKind(kind)))
        except ConceptError as exc:
            raise ConceptError(exc.message, input_name="preserve") from None
    return out


# -- files -------------------------------------------------------------------------------------

def load_concept_file(path: str | os.PathLike[str], kind: ConceptKind | str = ConceptKind.GENERIC,
                      anchors: str = "") -> ConceptSet:
    """Read a .txt, .csv or .json concept file (UTF-8). Nothing is kept from a file that fails."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FILE_EXTENSIONS:
        raise ConceptError(f"concept files must be {', '.join(FILE_EXTENSIONS)}, but got '{path.name}'. "
                           "Save the list in one of those formats.", input_name="file")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConceptError(f"concept files must be at most {MAX_FILE_BYTES // 2**20} MiB, but '{path.name}' "
                               f"is {path.stat().st_size / 2**20:.1f} MiB. Split the list.", input_name="file")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConceptError(f"the concept file must be readable, but '{path.name}' is not ({exc.strerror}). "
                           "Check that it exists.", input_name="file") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConceptError(f"concept files must be UTF-8, but '{path.name}' has a non-UTF-8 byte at "
                           f"line {line} (byte {exc.start}). Re-save it as UTF-8.", input_name="file") from None
    try:
        if ext == ".json":
            return from_json(text, where=path.name)
        if ext == ".csv":
            return _from_csv(text, path.name, kind)
        return ConceptSet(tuple(parse_inline(text, anchors, kind, where=path.name)))
    except ConceptError as exc:
        if exc.input_name == "file":
            raise
        message = exc.message if exc.message.startswith(path.name) else f"{path.name}: {exc.message}"
        raise ConceptError(message, input_name="file") from None


def _from_csv(text: str, where: str, kind: ConceptKind | str) -> ConceptSet:
    reader = csv.DictReader(io.StringIO(text))
    try:
        return _read_csv(reader, where, kind)
    except csv.Error as exc:  # e.g. a cell over the csv module's 128 KiB, often a quote left open
        line = reader.line_num + 1  # the lines before the record that failed
        raise ConceptError(f"{where} line {line}: the CSV must be readable, but {shown(str(exc), 80)}. Close "
                           "a quote left open there, or shorten the cell (at most "
                           f"{csv.field_size_limit():,} characters).", input_name="file") from None


def _read_csv(reader: csv.DictReader, where: str, kind: ConceptKind | str) -> ConceptSet:
    columns = {normalise(c): c for c in (reader.fieldnames or []) if c}
    name_col = columns.get("target") or columns.get("name")
    if name_col is None and "preserve" not in columns:
        found = shown_list(reader.fieldnames or [], show=shown) or "none"
        raise ConceptError(f"{where}: a concept CSV needs a 'target' (or 'name') column, but its "
                           f"header has: {found}. Add a header row such as 'target,anchor,aliases,kind'.",
                           input_name="file")
    targets, preserve = [], []
    width = len(reader.fieldnames or [])
    for row in reader:
        row_no = reader.line_num
        if None in row or any(v is None for v in row.values()):
            got = width + len(row.get(None) or []) - sum(v is None for k, v in row.items() if k is not None)
            raise ConceptError(f"{where} line {row_no}: every row must have the header's {width} columns, but "
                               f"this one has {got}. Quote cells that contain commas (\"a cat, sitting\").",
                               input_name="file")
        def cell(column: str, row: dict[str, Any] = row) -> str:
            key = columns.get(column)
            return (row.get(key) or "").strip() if key else ""

        try:
            row_kind = ConceptKind(cell("kind") or kind)
        except ValueError:
            raise ConceptError(f"{where} line {row_no}: kind must be one of "
                               f"{', '.join(k.value for k in ConceptKind)}, but got {shown(cell('kind'))}.",
                               input_name="file") from None
        name = (row.get(name_col) or "").strip() if name_col else ""
        if name:
            aliases = tuple(a.strip() for a in cell("aliases").split("|"))
            targets.append(Concept(name, cell("anchor"), aliases, row_kind))
        if cell("preserve"):
            preserve.append(Concept(cell("preserve"), kind=row_kind))
    return ConceptSet(tuple(targets), tuple(preserve))


def to_json(concepts: ConceptSet, name: str = "", description: str = "") -> str:
    """The versioned JSON form; :func:`from_json` reads it back to an equal ConceptSet."""
    body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name, "description": description}
    return json.dumps(body | concepts.describe(), indent=2, ensure_ascii=False) + "\n"


def from_json(text: str, where: str = "JSON") -> ConceptSet:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConceptError(f"{where} must be valid JSON, but line {exc.lineno} column {exc.colno}: "
                           f"{exc.msg}. Fix the file there.", input_name="file") from None
    except RecursionError:
        raise ConceptError(f"{where} must be a concept list, but its JSON is nested too deeply to read. "
                           "Save it with Save Concepts, or follow the schema in the docs.", input_name="file") from None
    except ValueError:  # a number of more than 4,300 digits (Python's int conversion limit)
        raise ConceptError(f"{where} must be a concept list, but it holds a number too long to read. "
                           "Save it with Save Concepts, or follow the schema in the docs.", input_name="file") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ConceptError(f"{where} must be a concept list (\"format\": \"{FORMAT_NAME}\"), but got "
                           f"{_kind_of(data)}. Save it with Save Concepts, or follow the schema in the docs.",
                           input_name="file")
    if data.get("version") != FORMAT_VERSION:
        raise ConceptError(f"{where} must be version {FORMAT_VERSION}, but got {_described(data.get('version'))}. "
                           "Update the node pack.", input_name="file")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConceptError(f"{where} has unknown keys {shown_list(unknown, show=shown)}; expected only {sorted(_TOP_KEYS)}. "
                           "Check their spelling.", input_name="file")
    for role in ("targets", "preserve"):
        if not isinstance(data.get(role, []), list):
            raise ConceptError(f"{where}: '{role}' must be a list, but got a {type(data[role]).__name__}.",
                               input_name="file")
    templates = data.get("templates") or {}
    if not isinstance(templates, dict) or not all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in templates.values()):
        raise ConceptError(f"{where}: 'templates' must map kinds to lists of strings, like "
                           '{"artist": ["painting by {}"]}.', input_name="file")
    targets = [_concept_from(item, where, "targets", i) for i, item in enumerate(data.get("targets") or [])]
    preserve = [_concept_from(item, where, "preserve", i) for i, item in enumerate(data.get("preserve") or [])]
    return ConceptSet(tuple(targets), tuple(preserve), templates)


def _concept_from(item: Any, where: str, role: str, index: int) -> Concept:
    if isinstance(item, str):
        return Concept(item)
    allowed = {"name", "aliases", "kind"} | ({"anchor"} if role == "targets" else set())
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - allowed:
        raise ConceptError(f"{where}: {role}[{index}] must be a name or an object with keys "
                           f"{sorted(allowed)} ('name' required), but got {_described(item)}.",
                           input_name="file")
    aliases = item.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ConceptError(f"{where}: {role}[{index}].aliases must be a list of strings.", input_name="file")
    for key in ("anchor", "kind"):
        if not isinstance(item.get(key, ""), str):
            raise ConceptError(f"{where}: {role}[{index}].{key} must be a string, but got "
                               f"{_described(item[key])}.", input_name="file")
    try:
        return Concept(item["name"], item.get("anchor", ""), tuple(aliases), item.get("kind", "generic"))
    except ConceptError as exc:
        raise ConceptError(f"{where}: {role}[{index}]: {exc.message}", input_name="file") from None


def _kind_of(data: Any) -> str:
    if isinstance(data, dict):
        return f"format {_described(data.get('format'))}"
    return f"a JSON {type(data).__name__}"


def _described(value: Any) -> str:
    """A JSON value for a message, bounded whatever its size: text and numbers quoted through
    :func:`shown`, objects by their first keys, lists by their length (never dumped whole)."""
    if isinstance(value, dict):
        return f"an object with keys {shown_list(list(value), show=shown)}" if value else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value):,} items"
    return shown(value)


def save_json(concepts: ConceptSet, path: str | os.PathLike[str], name: str = "") -> None:
    """Write :func:`to_json` atomically (a failed write leaves any existing file untouched)."""
    text = to_json(concepts, name=name or Path(path).stem)
    replace_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), keep_mode=True)


# -- presets -----------------------------------------------------------------------------------

def list_presets() -> list[str]:
    """Names of the presets shipped with the pack (``erasure_core/presets/*.json``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ConceptSet:
    if name not in list_presets():
        raise ConceptError(f"preset must be one of {list_presets()}, but got {shown(name)}. Pick a listed "
                           "preset.", input_name="preset")
    return load_concept_file(PRESET_DIR / f"{name}.json")


def list_preserve_sets() -> list[str]:
    """Names of the large preserve lists shipped with the pack (``erasure_core/preserve_sets``)."""
    return sorted(p.stem for p in PRESERVE_SET_DIR.glob("*.txt"))


def load_preserve_set(name: str) -> ConceptSet:
    """A preserve-only set: hundreds of names whose images must survive (the papers' retain sets,
    written for this pack)."""
    if name not in list_preserve_sets():
        raise ConceptError(f"preserve_set must be one of {list_preserve_sets()}, but got {shown(name)}.",
                           input_name="preserve_set")
    kind = PRESERVE_SET_KINDS.get(name, ConceptKind.GENERIC)
    names = split_entries((PRESERVE_SET_DIR / f"{name}.txt").read_text(encoding="utf-8"))
    return ConceptSet(preserve=tuple(Concept(n, kind=kind) for n in names))


class TemplateMode(str, Enum):
    """How Load Concepts expands names into prompts."""

    AS_GIVEN = "as given"  # the templates of the file or preset, else none
    NONE = "none"
    BUILTIN = "built-in per kind"
    CUSTOM = "custom"


def assemble(
    *,
    targets: str = "",
    anchors: str = "",
    preserve: str = "",
    kind: ConceptKind | str = ConceptKind.GENERIC,
    preset: str | None = None,
    file: str | os.PathLike[str] | None = None,
    templates: TemplateMode | str = TemplateMode.AS_GIVEN,
    custom_templates: str = "",
    extra: ConceptSet | None = None,
    preserve_set: str | None = None,
) -> ConceptSet:
    """Everything Load Concepts offers, merged in order: typed text, file, preset, ``extra``.

    Earlier sources win conflicts (a target's anchor; erased beats preserved), each conflict
    becoming a warning. The result has at least one target.
    """
    for name, text in (("targets", targets), ("anchors", anchors), ("preserve", preserve),
                       ("custom_templates", custom_templates)):
        check_text_size(text, name)
    try:
        mode = TemplateMode(templates)
    except ValueError:
        raise ConceptError(f"templates must be one of {', '.join(repr(m.value) for m in TemplateMode)}, but got "
                           f"{shown(str(templates))}. Pick one from the list.", input_name="templates") from None
    try:
        kind = ConceptKind(kind)
    except ValueError:
        raise ConceptError(f"kind must be one of {', '.join(repr(k.value) for k in ConceptKind)}, but got "
                           f"{shown(str(kind))}. Pick one from the list.", input_name="kind") from None
    parts = {"": ConceptSet(tuple(parse_inline(targets, anchors, kind)), tuple(parse_preserve(preserve, kind)))}
    if file is not None:
        parts["file"] = load_concept_file(file, kind)
    if preset is not None:
        parts["preset"] = load_preset(preset)
    if extra is not None:
        parts["concepts"] = extra
    # Merged unchecked: the templates chosen below decide the prompt count (a file's own templates
    # may be over the limit and 'none' under it). Nothing here builds a prompt.
    result = parts[""]
    for other in list(parts.values())[1:]:
        result = result.merged(other, check=False)
    if preserve_set is not None:  # targets win silently: a big list always names some of them
        erased = {normalise(n) for t in result.targets for n in t.names}
        keep = load_preserve_set(preserve_set).preserve
        dropped = [p.name for p in keep if normalise(p.name) in erased]
        extra_keep = tuple(p for p in keep if normalise(p.name) not in erased)
        note = (f"{len(dropped)} entries of the '{preserve_set}' preserve set are erased targets and "
                f"are not preserved: {', '.join(dropped[:5])}{'...' if len(dropped) > 5 else ''}.",)
        parts["preserve_set"] = ConceptSet(preserve=extra_keep, warnings=note if dropped else ())
        result = result.merged(parts["preserve_set"], check=False)
    if mode is TemplateMode.NONE:
        result = replace(result, templates={})
    elif mode is TemplateMode.BUILTIN:
        result = replace(result, templates=dict(BUILTIN_TEMPLATES))
    elif mode is TemplateMode.CUSTOM:
        lines = split_entries(custom_templates)
        if not lines:
            raise ConceptError("custom templates must list at least one template, but got none. "
                               "Write one per line, like 'a painting by {}'.", input_name="custom_templates")
        check_templates(lines, "custom_templates")
        result = replace(result, templates={"*": tuple(lines)})
    return result.check_prompt_count(*_prompt_limit_inputs(result, mode, parts)).require_targets()


def _prompt_limit_inputs(result: ConceptSet, mode: TemplateMode, parts: dict[str, ConceptSet]) -> tuple[str, str]:
    """The inputs that erase or preserve prompts over :data:`MAX_PROMPTS` blame: the templates
    when the names alone are within it, else the source giving the most names (``""``: the typed
    text). Counting only: nothing is built."""
    templates = "custom_templates" if mode is TemplateMode.CUSTOM else "templates"

    def blame(role: str) -> str:
        if result.prompt_count(role)[0] <= MAX_PROMPTS:
            return templates
        source = max(parts, key=lambda name: parts[name].prompt_count(role)[0])
        return source or role  # the typed input is named like the role ('targets', 'preserve')

    return blame("targets"), blame("preserve")
