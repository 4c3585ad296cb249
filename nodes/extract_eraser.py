"""Extract Eraser: a full erased UNet turned into a small low-rank eraser file that Apply Eraser LoRA
reads."""

from __future__ import annotations

import json
import logging
import os
import time

from ..erasure_core import ErasureError
from ..erasure_core.edit.extract import extract_low_rank, weight_differences
from ..erasure_core.formats.eraser_files import open_eraser
from ..erasure_core.formats.eraser_formats import EraserFormat, check_family, describe, is_unet_key
from . import _comfy
from ._report import report_ui
from ._schema import validation_message
from .types import io

logger = logging.getLogger(__name__)


def _check_target(target: str, source: str | None, overwrite: bool) -> None:
    """Refuse to write over the node's own input, or over an existing file unless ``overwrite``."""
    if source is not None and os.path.exists(target) and os.path.samefile(target, source):
        raise ErasureError(f"filename must differ from erased_file, but both are '{os.path.basename(target)}'. "
                           "Type a new name: the node never replaces its own input.", input_name="filename")
    _comfy.refuse_existing(target, overwrite, ErasureError)


class ExtractEraser(io.ComfyNode):
    DISPLAY_NAME = "Extract Eraser"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_ExtractEraser",
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure",
            description="Turn a full erased UNet (an ESD, RECE, ANT... checkpoint, or a second loaded MODEL) into a "
                        "small low-rank eraser file in models/erasers: the differences from the original model, "
                        "factored per weight with the rank and error reported. Apply it with Apply Eraser LoRA.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The original model the eraser was fine-tuned from. Not changed."),
                io.Combo.Input("erased_file", options=_comfy.eraser_choices(), default=_comfy.NO_FILE,
                               tooltip="The erased UNet weights (diffusers or LDM names; .safetensors, or .pt read "
                                       "as plain tensors only). Leave 'none' to use erased_model."),
                io.Int.Input("max_rank", default=64, min=1, max=1280,
                             tooltip="Largest rank per weight. Higher keeps more of the erasure and makes the file "
                                     "bigger."),
                io.Float.Input("max_error", default=0.05, min=0.0, max=0.99, step=0.005,
                               tooltip="Target relative error per weight (||dW - up@down|| / ||dW||): each weight "
                                       "gets the smallest rank reaching it, capped at max_rank."),
                io.String.Input("filename", default="extracted_eraser.safetensors",
                                tooltip="File name in models/erasers ('.safetensors' is added). Checked before "
                                        "any work."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: refuse before any work. "
                                         "The node never replaces its own erased_file."),
                io.String.Input("concept_text", default="",
                                tooltip="The erased concept(s), recorded in the file so Apply Eraser LoRA can gate "
                                        "on them."),
                io.Model.Input("erased_model", optional=True,
                               tooltip="The erased model loaded as a MODEL (instead of erased_file)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The original model with the extracted eraser applied "
                                                              "(to compare with the full erased model)."),
                io.String.Output(display_name="report", tooltip="Weights extracted, ranks, errors and file size."),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename=None) -> bool | str:
        """The file name, at queue time (cheap; nothing is touched)."""
        if filename is None:
            return True
        return validation_message(cls.DISPLAY_NAME, lambda: _comfy.check_file_name(
            filename, ".safetensors", "esd_vangogh.safetensors", ErasureError))

    @classmethod
    def execute(cls, model, erased_file: str, max_rank: int, max_error: float, filename: str,
                concept_text: str = "", erased_model=None, overwrite: bool = False) -> io.NodeOutput:
        started = time.perf_counter()
        target = _comfy.eraser_save_path(filename)
        source_path = _comfy.resolve_eraser(erased_file, "erased_file") if erased_file != _comfy.NO_FILE else None
        _check_target(target, source_path, overwrite)
        progress = _comfy.progress_bar()
        read_model, shapes, dtype_of = _comfy.unet_weight_reader(model)
        if source_path is not None:
            file = open_eraser(source_path, input_name="erased_file")
            info = describe(file.shapes, file.metadata, file.config, name=f"erased_file '{file.name}'",
                            input_name="erased_file")
            if info.format != EraserFormat.UNET_WEIGHTS:
                raise ErasureError(f"erased_file must hold UNet weights (an erased checkpoint), but it is a "
                                   f"{info.format.value} ({info.summary()}). Apply it with Apply Eraser LoRA.",
                                   input_name="erased_file")
            check_family(info, _comfy.model_family_of(model), name=f"erased_file '{file.name}'",
                         input_name="erased_file")
            diff = _comfy.unet_file_differences(model, file, [k for k in file if is_unet_key(k, info)],
                                                info.naming, _comfy.DIFF_FROM_BASE, progress, for_patching=False)
            source = file.name
        elif erased_model is not None:
            read_erased, erased_shapes, _ = _comfy.unet_weight_reader(erased_model)
            missing = sorted(set(shapes) - set(erased_shapes))
            if missing:
                raise ErasureError(f"erased_model must have the original's architecture, but it lacks "
                                   f"'{missing[0]}'.", input_name="erased_model")
            diff = weight_differences([(k, k) for k in shapes], read_erased, read_model, shapes,
                                      model_dtype=dtype_of, progress=progress, input_name="erased_model")
            source = "erased_model"
        else:
            raise ErasureError("pick erased_file or connect erased_model: there is nothing to extract from.",
                               input_name="erased_file")
        source_input = "erased_file" if source_path is not None else "erased_model"
        if not diff.deltas:
            raise ErasureError(f"{source} must differ from the model, but all {diff.compared} weights are equal "
                               "(within rounding). Connect the original model and the erased one.",
                               input_name=source_input)
        meta = {"source": source, "concept_text": concept_text.strip(),
                "family": _comfy.model_family_of(model), "changed_weights": diff.changed}
        patch, fit = extract_low_rank(diff.deltas, max_rank=max_rank, max_error=max_error, meta=meta,
                                      device=_comfy.compute_device(), progress=progress, input_name=source_input)
        patched = _comfy.apply_patchset(model, patch, 1.0)  # before writing: a refusal leaves no file behind
        _check_target(target, source_path, overwrite)  # again: the file may have appeared meanwhile
        patch.save(target)
        report = (f"Extracted {source} -> {target}: {diff.changed} of {diff.compared} weights differ; "
                  f"{fit.summary()} ({time.perf_counter() - started:.1f} s)")
        logger.info("Extract Eraser: %s; per key: %s", report, json.dumps(patch.meta["fits"])[:2000])
        return io.NodeOutput(patched, report, ui=report_ui(report, title=cls.DISPLAY_NAME))
