"""Save Erasure: a CE_PATCH written to models/loras as a standard LoRA file (the file logic is
``erasure_core.formats.lora_out``)."""

from __future__ import annotations

import logging
import os

from ..erasure_core import PatchError, PatchSet
from ..erasure_core.formats.lora_out import DenseAs, Precision, lora_bytes
from ..erasure_core.formats.safetensors_out import write_atomic
from . import _comfy
from ._report import Bar, report_ui
from .types import PATCH, io

logger = logging.getLogger(__name__)


class SaveErasure(io.ComfyNode):
    DISPLAY_NAME = "Save Erasure"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_SaveErasure",
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure/io",
            description="Write an erasure (Closed-Form Erase's patch) to models/loras as a standard LoRA file: "
                        "ComfyUI's Load LoRA, Apply Eraser LoRA (with its gate) and kohya-style tools read it. "
                        "Records the method, concepts, options, pack version and model family.",
            is_output_node=True,
            inputs=[
                PATCH.Input("patch", tooltip="The edit from Closed-Form Erase's 'patch' output."),
                io.String.Input("filename", default="erased_concept.safetensors",
                                tooltip="File name in models/loras ('.safetensors' is added). A plain name, "
                                        "no folders."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: refuse, before any work."),
                io.Combo.Input("dense_as", options=DenseAs, default=DenseAs.DIFFERENCE,
                               tooltip="How full-rank edits (many concepts, or the paper's 77-token keys) are "
                                       "stored. 'weight difference': exact, ComfyUI's 'diff' LoRA keys (ComfyUI, "
                                       "A1111/Forge read them). 'low rank': factored to max_rank/max_error; smaller, "
                                       "readable by every LoRA tool, with the error reported. Low-rank edits are "
                                       "always stored as their exact factors."),
                io.Int.Input("max_rank", default=64, min=1, max=2048,
                             tooltip="With dense_as = low rank: the largest rank per weight."),
                io.Float.Input("max_error", default=0.01, min=0.0, max=0.99, step=0.005,
                               tooltip="With dense_as = low rank: target relative error per weight "
                                       "(||dW - up@down|| / ||dW||); each weight gets the smallest rank reaching "
                                       "it, capped at max_rank."),
                io.Combo.Input("precision", options=Precision, default=Precision.FLOAT16,
                               tooltip="Number format of the file. float16 is what LoRAs usually use (half the "
                                       "size of float32, relative error ~1e-3); float32 reproduces the edit to "
                                       "~1e-7."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the LoRA was written."),
                     io.String.Output(display_name="report", tooltip="Modules, storage, rank, error and size.")],
        )

    @classmethod
    def execute(cls, patch: PatchSet, filename: str, overwrite: bool, dense_as: str = DenseAs.DIFFERENCE.value,
                max_rank: int = 64, max_error: float = 0.01, precision: str = Precision.FLOAT16.value) -> io.NodeOutput:
        path = _comfy.loras_save_path(filename)
        _comfy.refuse_existing(path, overwrite, PatchError)
        if not isinstance(patch, PatchSet):
            raise PatchError(f"patch must be a CE_PATCH from Closed-Form Erase, but got {type(patch).__name__}.",
                             input_name="patch")
        data, report = lora_bytes(patch, dense_as=dense_as, max_rank=max_rank, max_error=max_error,
                                  precision=precision, device=_comfy.compute_device(), progress=_comfy.progress_bar())
        write_atomic(path, data)
        lines = [f"saved to models/loras/{os.path.basename(path)}", *report.lines()]
        logger.info("Save Erasure: %s", "; ".join(lines))
        bar = Bar("max relative error", report.max_error, limit=max(max_error, 0.01), good="low",
                  text=f"{report.max_error:.2e}")
        text = "\n".join(lines)
        return io.NodeOutput(path, text, ui=report_ui(text, title=cls.DISPLAY_NAME, lines=lines, bars=[bar]))
