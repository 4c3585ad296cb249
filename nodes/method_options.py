"""Options nodes: every option of one closed-form method, with the paper's presets, feeding the
optional 'options' input of Closed-Form Erase (Advanced-ControlNet's extras pattern)."""

from __future__ import annotations

import dataclasses

from ..erasure_core import CUSTOM_PRESET, make_config, methods
from ._schema import config_input
from .types import OPTIONS, io

LATER_OPTIONS = ("preserve_bank",)  # shared options added in 0.3 (the widgets list is positional)


class MethodOptions(io.ComfyNode):
    """Base: subclasses set METHOD, NODE_ID and DISPLAY_NAME; the schema comes from the config."""

    METHOD = ""
    NODE_ID = ""
    DISPLAY_NAME = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        spec = methods.get(cls.METHOD)
        names = [f.name for f in dataclasses.fields(spec.config_cls)]
        # options added after release go last, so saved workflows keep their widget positions
        fields = [n for n in names if n not in LATER_OPTIONS] + [n for n in LATER_OPTIONS if n in names]
        presets = [CUSTOM_PRESET, *spec.presets]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure/advanced",
            description=f"All options of {spec.description} Connect to Closed-Form Erase's 'options' "
                        "input (with the same method); they replace the node's own options.",
            inputs=[
                io.Combo.Input("preset", options=presets, default=CUSTOM_PRESET,
                               tooltip="custom: use the values below. A named preset replaces the values "
                                       "it sets with the paper's setting of that name: "
                                       + "; ".join(f"{k}: {dict(v) or 'defaults'}" for k, v in spec.presets.items())),
                *(config_input(spec.config_cls, name) for name in fields),
            ],
            outputs=[OPTIONS.Output(display_name="options", tooltip=f"{cls.METHOD} options for Closed-Form Erase.")],
        )

    @classmethod
    def execute(cls, preset: str, **values) -> io.NodeOutput:
        return io.NodeOutput(make_config(cls.METHOD, preset=preset, **values))


class UCEOptions(MethodOptions):
    METHOD, NODE_ID, DISPLAY_NAME = "uce", "CE_UCEOptions", "UCE Options"


class SPEEDOptions(MethodOptions):
    METHOD, NODE_ID, DISPLAY_NAME = "speed", "CE_SPEEDOptions", "SPEED Options"


class RECEOptions(MethodOptions):
    METHOD, NODE_ID, DISPLAY_NAME = "rece", "CE_RECEOptions", "RECE Options"


class RealEraOptions(MethodOptions):
    METHOD, NODE_ID, DISPLAY_NAME = "realera", "CE_RealEraOptions", "RealEra Options"
