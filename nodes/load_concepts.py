"""The concept nodes: Load Concepts (typed text, presets, files), Merge Concepts, Save Concepts."""

from __future__ import annotations

import os

from ..erasure_core import ConceptError, ConceptKind, ConceptSet
from ..erasure_core.concepts import check_prompt_lengths
from ..erasure_core.formats.concept_files import TemplateMode, assemble, list_preserve_sets, list_presets, save_json
from . import _comfy
from ._report import report_ui
from ._schema import validation_message
from .types import CONCEPTS, io

NO_PRESET = "none"
QUEUE_FILE_BYTES = 64 * 1024
"""The largest concept file Load Concepts reads at queue time (about 4,000 names: a few tenths of a
second with templates). A larger one (up to the 8 MiB a file may hold: a minute of parsing and
token counting) is only located there, and read when the node runs, so queueing a prompt stays
cheap whatever the file's size; the typed inputs are checked either way."""
SYNTAX = ("One concept per line (or separated by ';'). 'name | alias | alias' erases the aliases too; "
          "'name -> anchor' sets this target's anchor ('-> \"\"' erases toward nothing).")


def _load(targets, anchors, preserve, kind, preset, file, templates, custom_templates, preserve_set=NO_PRESET,
          concepts=None):
    result = assemble(
        targets=targets, anchors=anchors, preserve=preserve, kind=kind,
        preset=None if preset == NO_PRESET else preset, file=_comfy.resolve_concept_file(file),
        templates=templates, custom_templates=custom_templates, extra=concepts,
        preserve_set=None if preserve_set == NO_PRESET else preserve_set)
    _check_embeddings(result, {"targets": targets, "anchors": anchors, "preserve": preserve,
                               "custom_templates": custom_templates})
    check_prompt_lengths(result, _comfy.clip_token_counter())
    return result


def _size(path: str) -> int:
    """The file's size, or 0 when it cannot be read (then reading it gives the clear error)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _check_embeddings(result: ConceptSet, typed: dict[str, str]) -> None:
    """Refuse an ``embedding:name`` that ComfyUI would drop (only a log line), naming the input
    that holds it; prompts from files and presets are named as ``file``."""
    prompts = [p for pair in result.erase_pairs() for p in pair] + result.preserve_prompts()
    # one pass over the distinct prompts (templates repeat every name in many prompts)
    for name in _comfy.missing_embeddings("\n".join(dict.fromkeys(prompts))):
        source = next((k for k, text in typed.items() if f"embedding:{name}" in (text or "")), "file")
        raise ConceptError(f"every embedding must exist in models/embeddings, but 'embedding:{name}' does "
                           "not (ComfyUI would silently drop it from the prompt). Put the embedding file "
                           "there or fix the name.", input_name=source)


class LoadConcepts(io.ComfyNode):
    DISPLAY_NAME = "Load Concepts"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_LoadConcepts",
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure",
            description="The concepts to erase, what each becomes, and what must stay as it is: "
                        "typed, from a preset, or from a .txt/.csv/.json file. " + SYNTAX,
            inputs=[
                io.String.Input("targets", multiline=True, default="",
                                placeholder="Vincent van Gogh | Van Gogh -> a painter",
                                tooltip="Concepts to erase (an artist, a celebrity, an object...). " + SYNTAX),
                io.String.Input("anchors", multiline=True, default="",
                                tooltip="Anchors for typed targets written without '->': one for all, or "
                                        "one per such target in order. Empty erases toward nothing; a "
                                        "broader concept ('a painter') usually gives cleaner images."),
                io.String.Input("preserve", multiline=True, default="",
                                tooltip="Concepts whose images must not change (for example other artists), "
                                        "one per line; 'name | alias' preserves the aliases too."),
                io.Combo.Input("kind", options=ConceptKind, default=ConceptKind.GENERIC,
                               tooltip="Kind of the typed concepts (files and presets carry their own). "
                                       "It picks the built-in templates."),
                io.Combo.Input("preset", options=[NO_PRESET, *list_presets()], default=NO_PRESET,
                               tooltip="A ready-made list with anchors and a matching preserve set, merged "
                                       "after the typed concepts and the file."),
                io.Combo.Input("file", options=_comfy.concept_file_choices(), default=_comfy.NO_FILE,
                               tooltip="A .txt, .csv or .json concept file from models/concepts or the "
                                       "input folder (see the node docs for the formats)."),
                io.Combo.Input("templates", options=TemplateMode, default=TemplateMode.AS_GIVEN,
                               tooltip="Expand each name into several prompts. 'as given' uses the "
                                       "templates of the file or preset (none for typed text); 'built-in "
                                       "per kind' uses ours (e.g. 'painting by {}' for artists); more "
                                       "prompts erase more robustly but cost preservation."),
                io.String.Input("custom_templates", multiline=True, default="",
                                placeholder="a painting by {}\na photo of {}",
                                tooltip="With templates = custom: one template per line, '{}' marks the "
                                        "concept."),
                io.Combo.Input("preserve_set", options=[NO_PRESET, *list_preserve_sets()], default=NO_PRESET,
                               tooltip="Add a large preserve list written for this pack (hundreds of "
                                       "artists, celebrities or object/character instances), as the "
                                       "papers' retain sets; entries you erase are left out. Protects "
                                       "neighbours better but costs some erasure strength, and the first "
                                       "run encodes them all (later runs reuse the cached encodings)."),
                CONCEPTS.Input("concepts", optional=True,
                               tooltip="Concepts to extend (merged last; earlier sources win conflicts)."),
            ],
            outputs=[CONCEPTS.Output(display_name="concepts",
                                     tooltip="The validated concepts, for Closed-Form Erase.")],
        )

    @classmethod
    def validate_inputs(cls, targets=None, anchors=None, preserve=None, kind="generic", preset=NO_PRESET,
                        file=_comfy.NO_FILE, templates="as given", custom_templates="",
                        preserve_set=NO_PRESET) -> bool | str:
        values = (targets, anchors, preserve, kind, preset, file, templates, custom_templates, preserve_set)
        if any(v is None for v in values):
            return True  # an input is linked: checked when the node runs

        def check() -> None:
            # a large file is read when the node runs; the typed inputs and the preset are checked now
            path = _comfy.resolve_concept_file(file)
            read = file if path is None or _size(path) <= QUEUE_FILE_BYTES else _comfy.NO_FILE
            # A linked 'concepts' input may supply the targets: only check what the widgets decide.
            if targets.strip() or preset != NO_PRESET or read != _comfy.NO_FILE:
                _load(targets, anchors, preserve, kind, preset, read, templates, custom_templates, preserve_set)

        return validation_message(cls.DISPLAY_NAME, check)

    @classmethod
    def execute(cls, targets, anchors, preserve, kind="generic", preset=NO_PRESET, file=_comfy.NO_FILE,
                templates="as given", custom_templates="", preserve_set=NO_PRESET,
                concepts: ConceptSet | None = None) -> io.NodeOutput:
        result = _load(targets, anchors, preserve, kind, preset, file, templates, custom_templates, preserve_set,
                       concepts)
        return io.NodeOutput(result, ui=report_ui(result.summary(), title=cls.DISPLAY_NAME))

    @classmethod
    def fingerprint_inputs(cls, file=None, **_) -> object:
        """Re-run when the picked file changes on disk (ComfyUI caches on inputs otherwise)."""
        return _comfy.file_fingerprint(file, _comfy.resolve_concept_file)


class MergeConcepts(io.ComfyNode):
    DISPLAY_NAME = "Merge Concepts"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_MergeConcepts",
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure",
            description="Union of two concept sets, to erase e.g. a preset plus your own list in one "
                        "edit. Conflicts are reported on the node: the first input wins a target's "
                        "anchor; a concept erased by one and preserved by the other is erased.",
            inputs=[CONCEPTS.Input("concepts_a", tooltip="First set (wins conflicts)."),
                    CONCEPTS.Input("concepts_b", tooltip="Second set.")],
            outputs=[CONCEPTS.Output(display_name="concepts", tooltip="The merged concepts.")],
        )

    @classmethod
    def execute(cls, concepts_a: ConceptSet, concepts_b: ConceptSet) -> io.NodeOutput:
        # two sets within the prompt limit can exceed it together; the second input is named
        merged = concepts_a.merged(concepts_b, check=False).check_prompt_count("concepts_b", "concepts_b")
        merged = merged.require_targets()
        return io.NodeOutput(merged, ui=report_ui(merged.summary(), title=cls.DISPLAY_NAME))


class SaveConcepts(io.ComfyNode):
    DISPLAY_NAME = "Save Concepts"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_SaveConcepts",
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure/io",
            description="Write concepts to models/concepts as versioned JSON, so a team can share a "
                        "list; Load Concepts reads it back identically.",
            inputs=[CONCEPTS.Input("concepts", tooltip="The concepts to save."),
                    io.String.Input("filename", default="my_concepts.json",
                                    tooltip="File name in models/concepts ('.json' is added)."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace an existing file of that name. Off: refuse.")],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None) -> bool | str:
        """The file name, at queue time (cheap; nothing is touched)."""
        if filename is None:
            return True
        return validation_message(cls.DISPLAY_NAME, lambda: _comfy.check_file_name(
            filename, ".json", "my_artists.json", ConceptError))

    @classmethod
    def execute(cls, concepts: ConceptSet, filename: str, overwrite: bool) -> io.NodeOutput:
        path = _comfy.concepts_save_path(filename)
        _comfy.refuse_existing(path, overwrite, ConceptError)
        save_json(concepts, path)
        return io.NodeOutput(path, ui=report_ui(f"saved {len(concepts.targets)} targets to {path}", title=cls.DISPLAY_NAME))
