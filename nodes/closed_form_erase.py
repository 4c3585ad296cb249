"""Closed-Form Erase: solve new cross-attention K/V weights (UCE, SPEED, RECE) and patch a clone of the model."""

from __future__ import annotations

import logging

from ..erasure_core import ClosedFormConfig, ConceptSet, erase, methods, node_config
from . import _comfy
from ._report import report_ui
from ._schema import config_input, names_node
from .types import CONCEPTS, PATCH, io
from .types import OPTIONS as OPTIONS_SOCKET

logger = logging.getLogger(__name__)

DISPLAY_NAME = "Closed-Form Erase"
OPTIONS = ("token_pick", "erase_scale", "preserve_scale", "lamb", "preserve_empty_prompt", "solve_dtype")


class ClosedFormErase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        method_help = " ".join(f"{m}: {methods.get(m).description}" for m in methods.names())
        return io.Schema(
            node_id="CE_ClosedFormErase",
            display_name=DISPLAY_NAME,
            category="concept_erasure",
            description="Erase concepts by solving new cross-attention K/V weights in closed form. "
                        "Outputs a patched copy of the model; the input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="Model to edit: SD1.x, SD2.x, SDXL, or a DiT (Flux, SD3/3.5, "
                                                "Chroma, Qwen-Image, Lumina 2, AuraFlow, PixArt, LTXV, WAN), "
                                                "whose text projection is edited. It is not changed; LoRAs "
                                                "applied before this node are kept."),
                io.Clip.Input("clip", tooltip="The text encoder of this model (CLIP, T5, CLIP-L + T5, Qwen2.5-VL, "
                                              "Gemma...), used to encode the concepts exactly as your prompts "
                                              "are encoded."),
                CONCEPTS.Input("concepts", tooltip="From Load Concepts."),
                io.Combo.Input("method", options=methods.names(), default="uce", tooltip=method_help),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scale of the edit, like a LoRA strength. 1 is the solved "
                                       "edit, 0 the original model; lower it to soften the erasure."),
                *(config_input(ClosedFormConfig, name) for name in OPTIONS),
                OPTIONS_SOCKET.Input("options", optional=True,
                                     tooltip="From UCE/SPEED/RECE/RealEra Options: every option of that method; replaces "
                                             "the options above. Without it, UCE, RECE and MACE use the options "
                                             "above and SPEED its paper defaults."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Patched copy of the model."),
                PATCH.Output(display_name="patch", tooltip="The weight edit, for saving or re-applying."),
                io.String.Output(display_name="report", tooltip="Sites edited, rank and time."),
            ],
        )

    @classmethod
    @names_node(DISPLAY_NAME)
    def execute(cls, model, clip, concepts: ConceptSet, method: str, strength: float, options=None,
                **widgets) -> io.NodeOutput:
        config, source = node_config(method, widgets, options)
        progress = _comfy.progress_bar()
        arch, sites = _comfy.attention_sites(model)
        encoder = _comfy.cached_encoder(clip, progress=progress, text_length=getattr(config, "text_length", 0))
        patch = erase(method, sites, concepts, encoder, config, device=_comfy.compute_device(),
                      progress=progress)
        patched = _comfy.apply_patchset(model, patch, strength)
        report = (f"{method.upper()} on {arch.display_name}: {patch.meta['sites']} sites edited, "
                  f"rank {patch.meta['rank']}, {patch.meta['seconds']:.2f} s, strength {strength}; "
                  f"{encoder.misses} prompts encoded, {encoder.hits} from cache; {source}")
        logger.info("Closed-Form Erase: %s", report)
        return io.NodeOutput(patched, patch, report, ui=report_ui(report, title=DISPLAY_NAME))
