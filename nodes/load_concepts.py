"""Load Concepts: the targets to erase, what they become, and what must not change."""

from __future__ import annotations

from ..erasure_core import ConceptSet
from ._schema import names_node, validation_message
from .types import CONCEPTS, io, ui

DISPLAY_NAME = "Load Concepts"


class LoadConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_LoadConcepts",
            display_name=DISPLAY_NAME,
            category="concept_erasure",
            description="Type the concepts to erase, the anchor each one should turn into, and "
                        "concepts that must stay as they are. One per line, or separated by ';'.",
            inputs=[
                io.String.Input("targets", multiline=True, default="Van Gogh",
                                tooltip="Concepts to erase, one per line or separated by ';' "
                                        "(for example an artist, a celebrity or an object)."),
                io.String.Input("anchors", multiline=True, default="",
                                tooltip="What each target should become: one anchor for all "
                                        "targets, or one per target in the same order. Empty "
                                        "erases toward nothing (the empty prompt). A broader "
                                        "concept ('a painter') usually gives cleaner images."),
                io.String.Input("preserve", multiline=True, default="",
                                tooltip="Concepts whose images must not change (for example other "
                                        "artists). Each one costs a little erasure strength."),
            ],
            outputs=[CONCEPTS.Output(display_name="concepts",
                                     tooltip="The validated concepts, for Closed-Form Erase.")],
        )

    @classmethod
    def validate_inputs(cls, targets: str | None = None, anchors: str | None = None,
                        preserve: str | None = None) -> bool | str:
        if targets is None or anchors is None or preserve is None:
            return True  # linked from another node: checked when the node runs
        return validation_message(DISPLAY_NAME, lambda: ConceptSet.from_text(targets, anchors, preserve))

    @classmethod
    @names_node(DISPLAY_NAME)
    def execute(cls, targets: str, anchors: str, preserve: str) -> io.NodeOutput:
        concepts = ConceptSet.from_text(targets, anchors, preserve)
        pairs = ", ".join(f"{t} → {a or '∅'}" for t, a in zip(concepts.targets, concepts.anchors, strict=True))
        text = f"erase: {pairs}; preserve: {len(concepts.preserve)}"
        return io.NodeOutput(concepts, ui=ui.PreviewText(text))
