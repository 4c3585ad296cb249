"""Apply Eraser LoRA: any published eraser file (LoRA, Receler adapters, partial/full UNet weights,
text encoder, our patch files), applied on clones and optionally gated per prompt. (Extract
Eraser, which writes such files, is in ``extract_eraser.py``.)"""

from __future__ import annotations

import logging
import re
import time

from ..erasure_core import ConceptError, ErasureError, PatchSet
from ..erasure_core.edit.adapters import BlockAdapters, parse_receler
from ..erasure_core.formats.eraser_files import SAFE_EXTENSIONS, open_eraser
from ..erasure_core.formats.eraser_formats import EraserFormat, EraserInfo, check_family, describe, is_unet_key
from ..erasure_core.gating.ft_gate import ft_gate, gate_targets
from . import _comfy
from ._report import Bar, report_ui
from ._schema import validation_message
from .types import io

logger = logging.getLogger(__name__)

GATE_OFF, GATE_FT = "off", "facilitated transport"
DIFF_HELP = (f"What the eraser's weights are compared with (partial/full UNet and text-encoder files). "
             f"'{_comfy.DIFF_FROM_BASE}' (default): the checkpoint's own weights, so the erasure is "
             f"W_file - W_checkpoint and stacks with LoRAs and other erasers applied before. "
             f"'{_comfy.DIFF_FROM_ARRIVING}': the weights with earlier patches, so at strength 1 the "
             "patched weights equal the file's exactly (earlier patches on those weights are undone).")


def split_concepts(text: str) -> tuple[str, ...]:
    """Concept texts typed or recorded in metadata: one per line, ';' or ',' separated."""
    return tuple(p.strip() for p in re.split(r"[\n;,]", text or "") if p.strip())


def eraser_gate_targets(concept_text: str, file_concepts: str, file_name: str) -> tuple[str, ...]:
    """The distinct concepts the gate compares the prompt with: the typed ``concept_text``, else
    the file's metadata; at most :data:`MAX_GATE_CONCEPTS` (refused naming where they came from)."""
    return gate_targets(split_concepts(concept_text), split_concepts(file_concepts), "concept_text", "eraser",
                        f"the metadata of eraser '{file_name}'")


def compute_gate(clip, prompt: str, concepts: tuple[str, ...], facilitate_factor: float,
                 gate_threshold: float, progress=None) -> tuple[float, str]:
    """SPM's Facilitated Transport score of ``prompt`` against the eraser's concepts (max over
    concepts of max(flattened-CLIP cosine, token overlap)), ramped from ``gate_threshold``:
    ``gate = factor · clamp((score − threshold) / (1 − threshold), 0, 1)`` (threshold 0 is the
    paper's gate)."""
    if clip is None:
        raise ConceptError("gating needs the model's CLIP to encode the prompt, but 'clip' is not connected. "
                           "Connect the CLIP, or set gate to off.", input_name="clip")
    if not prompt.strip():
        raise ConceptError("the prompt must be the positive prompt you sample (the gate is computed from it), "
                           "but it is empty. Link the same String node into CLIP Text Encode and into 'prompt', "
                           "or set gate to off.", input_name="prompt")
    if not concepts:
        raise ConceptError("gating needs the concept the eraser removes, but the file records none and "
                           "concept_text is empty. Type it in concept_text (e.g. 'Van Gogh').",
                           input_name="concept_text")
    if not 0.0 <= gate_threshold < 1.0:
        raise ConceptError(f"gate_threshold must be in [0, 1), but got {gate_threshold}.", input_name="gate_threshold")
    hidden, ids, special, _ = _comfy.encode_first_windows(clip, [prompt, *concepts], progress)
    ft = ft_gate(hidden[0], ids[0], hidden[1:], list(ids[1:]), special, facilitate_factor=1.0)
    ramp = min(1.0, max(0.0, (ft.raw - gate_threshold) / (1.0 - gate_threshold)))
    gate = facilitate_factor * ramp
    threshold = f", threshold {gate_threshold:g}" if gate_threshold else ""
    score = ft.describe(list(concepts)).replace("gate ", "FT score ", 1)
    return gate, f"{score}{threshold} x factor {facilitate_factor:g} -> gate {gate:.3f}"


def apply_eraser(model, clip, info: EraserInfo, file, path: str, scale: float, reference: str,
                 progress) -> tuple[object, object, str]:
    """(patched model, patched clip, what was applied) for one eraser file at ``scale``."""
    fmt = info.format
    if fmt == EraserFormat.PATCH:
        patch = PatchSet.load(path, input_name="eraser")
        patched = _comfy.apply_patchset(model, patch, scale, input_name="eraser")
        return patched, clip, f"{len(patch)} UNet weights (low-rank)"
    if fmt in (EraserFormat.KOHYA_LORA, EraserFormat.DIFFUSERS_LORA):
        unet, text, unplaced = _comfy.lora_patches(model, clip, file)
        skipped = [m for m in unplaced if clip is None and _is_text_module(m)]
        unplaced = [m for m in unplaced if m not in skipped]
        if unplaced and not (unet or text):
            raise ErasureError(
                f"the LoRA's modules must exist in the connected {_comfy.model_family_of(model)} model, but none "
                f"of its {len(unplaced)} do (first: '{unplaced[0]}'). {info.summary()}.", input_name="eraser")
        if unplaced:
            raise ErasureError(
                f"every LoRA module must exist in the connected model, but {len(unplaced)} do not (first: "
                f"'{unplaced[0]}'). Pick the LoRA made for this model.", input_name="eraser")
        out_model = _comfy.add_lora_patches(model, unet, scale) if unet else model
        out_clip = _comfy.add_lora_patches(clip, text, scale) if text else clip
        note = f"; {len(skipped)} text-encoder modules skipped (clip is not connected)" if skipped else ""
        return out_model, out_clip, f"{len(unet)} UNet + {len(text)} text-encoder weights as LoRA{note}"
    if fmt == EraserFormat.RECELER:
        adapters = parse_receler(file.load_all())
        blocks = _comfy.receler_blocks(model, adapters)
        patched = _comfy.add_attn2_output_patch(model, BlockAdapters(blocks, scale, file.name))
        return patched, clip, f"{len(blocks)} attention-output adapters"
    if fmt == EraserFormat.UNET_WEIGHTS:
        keys = [k for k in file if is_unet_key(k, info)]
        diff = _comfy.unet_file_differences(model, file, keys, info.naming, reference, progress)
        _, _, dtype_of = _comfy.unet_weight_reader(model)
        patched = _comfy.add_diff_patches(model, diff.deltas, scale, dtype_of) if diff.deltas else model
        note = f"{diff.changed} of {diff.compared} UNet weights differ from the model (diff patches)"
        if "text encoder" in info.targets:  # a whole erased checkpoint: its text encoder may be erased too
            if clip is None:
                note += "; its text-encoder weights were not compared (clip is not connected)"
            else:
                text_diff, text_dtype = _comfy.text_encoder_differences(clip, file, _comfy.text_encoder_pairs(clip, file),
                                                                        reference)
                if text_diff.deltas:
                    clip = _comfy.add_diff_patches(clip, text_diff.deltas, scale, text_dtype)
                note += f"; {text_diff.changed} of {text_diff.compared} text-encoder weights differ"
        total = len(model.model_state_dict(filter_prefix=_comfy.UNET_PREFIX))
        if diff.compared >= 0.9 * total and diff.changed >= 0.9 * diff.compared:
            note += ("; nearly every weight differs: is the model the checkpoint the eraser was fine-tuned from? "
                     "Extract Eraser turns this file into a small one")
        return patched, clip, note
    if fmt == EraserFormat.TEXT_ENCODER:
        if clip is None:
            raise ErasureError("a text-encoder eraser patches the CLIP, but 'clip' is not connected. Connect the "
                               "model's CLIP.", input_name="clip")
        pairs = _comfy.text_encoder_pairs(clip, file)
        diff, dtype_of = _comfy.text_encoder_differences(clip, file, pairs, reference)
        patched = _comfy.add_diff_patches(clip, diff.deltas, scale, dtype_of) if diff.deltas else clip
        return model, patched, f"{diff.changed} of {diff.compared} text-encoder weights differ (diff patches)"
    raise ErasureError(f"format {fmt.value} cannot be applied yet.", input_name="eraser")  # pragma: no cover


def _is_text_module(name: str) -> bool:
    return name.startswith(("lora_te", "text_encoder", "te.", "te1", "te2")) or "text_model" in name


class ApplyEraserLoRA(io.ComfyNode):
    DISPLAY_NAME = "Apply Eraser LoRA"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_ApplyEraserLoRA",
            display_name=cls.DISPLAY_NAME,
            category="concept_erasure",
            description="Apply a published erasure result, whatever its format: kohya or diffusers/PEFT LoRAs "
                        "(MACE, SPM, EraseAnything), Receler adapters, partial or full erased UNets (ESD, UCE, "
                        "RECE, ANT, TRCE), text encoders (AdvUnlearn, few-shot erasing) and our patch files. "
                        "Optionally gated per prompt. Chain several to stack them. Inputs are not changed.",
            inputs=[
                io.Model.Input("model", tooltip="Model to patch. It is not changed; LoRAs and erasers applied "
                                                "before this node are kept."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The model's text encoder: patched by text-encoder erasers and LoRAs, and "
                                      "used to compute the gate."),
                io.Combo.Input("eraser", options=_comfy.eraser_choices(), default=_comfy.NO_FILE,
                               tooltip="Eraser file from models/erasers ('loras/...' are from models/loras). "
                                       "Receler: put eraser_weights.pt and eraser_config.json in a sub-folder. "
                                       ".pt/.bin files are read as plain tensors only (never unpickled)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scale of the erasure: 1 is the published eraser, 0 the input model. "
                                       "For weight files, the difference from the model is scaled."),
                io.Combo.Input("difference_from", options=[_comfy.DIFF_FROM_BASE, _comfy.DIFF_FROM_ARRIVING],
                               default=_comfy.DIFF_FROM_BASE, tooltip=DIFF_HELP),
                io.Combo.Input("gate", options=[GATE_OFF, GATE_FT], default=GATE_OFF,
                               tooltip="off: the eraser always acts. facilitated transport: it acts as strongly "
                                       "as 'prompt' resembles the erased concept (SPM's gate: max of CLIP "
                                       "cosine and token overlap), so unrelated prompts are left alone."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="With gate on: the positive prompt you sample. Link the same String node "
                                        "that feeds CLIP Text Encode, so the prompt is typed once."),
                io.String.Input("concept_text", default="",
                                tooltip="With gate on: the concept(s) the eraser removes, comma-separated. "
                                        "Empty: the file's metadata (SPM 'prompts', our 'concept_text')."),
                io.Float.Input("facilitate_factor", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="With gate on: scales the gate (SPM's --facilitate_factor; 1 = paper)."),
                io.Float.Input("gate_threshold", default=0.0, min=0.0, max=0.99, step=0.01,
                               tooltip="With gate on: scores at or below this give gate 0, above it the gate "
                                       "ramps linearly to 1. 0 is the paper's gate; raise it (e.g. 0.7) so "
                                       "unrelated prompts get exactly the input model."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Patched copy of the model."),
                io.Clip.Output(display_name="clip", tooltip="Patched copy of the CLIP (text-encoder erasers and "
                                                            "LoRAs with text-encoder weights), else the input."),
                io.String.Output(display_name="report", tooltip="Format, weights patched, rank, gate."),
            ],
        )

    @classmethod
    def execute(cls, model, eraser: str, strength: float, difference_from: str = _comfy.DIFF_FROM_BASE,
                gate: str = GATE_OFF, prompt: str = "", concept_text: str = "", facilitate_factor: float = 1.0,
                gate_threshold: float = 0.0, clip=None) -> io.NodeOutput:
        if difference_from not in (_comfy.DIFF_FROM_BASE, _comfy.DIFF_FROM_ARRIVING):
            raise ErasureError(f"difference_from must be '{_comfy.DIFF_FROM_BASE}' or '{_comfy.DIFF_FROM_ARRIVING}', "
                               f"but got {difference_from!r}.", input_name="difference_from")
        if gate not in (GATE_OFF, GATE_FT):
            raise ErasureError(f"gate must be '{GATE_OFF}' or '{GATE_FT}', but got {gate!r}.", input_name="gate")
        started = time.perf_counter()
        progress = _comfy.progress_bar()
        path = _comfy.resolve_eraser(eraser)
        file = open_eraser(path)
        info = describe(file.shapes, file.metadata, file.config, name=f"eraser '{file.name}'")
        check_family(info, _comfy.model_family_of(model), name=f"eraser '{file.name}'")
        scale, gate_line, gate_value = strength, "gate off", None
        if gate == GATE_FT:
            concepts = eraser_gate_targets(concept_text, info.concept_text, file.name)
            gate_value, gate_line = compute_gate(clip, prompt, concepts, facilitate_factor, gate_threshold, progress)
            scale = strength * gate_value
        if gate == GATE_FT and scale == 0.0:
            out_model, out_clip, applied = model, clip, "nothing (gate 0: the prompt is unrelated)"
        else:
            out_model, out_clip, applied = apply_eraser(model, clip, info, file, path, scale, difference_from,
                                                        progress)
        seconds = time.perf_counter() - started
        report = (f"{file.name}: {info.summary()}; applied {applied} at strength {strength:g}"
                  f"{f' x gate = {scale:.3f}' if gate == GATE_FT else ''}; {gate_line}"
                  f"{'; ' + '; '.join(info.notes) if info.notes else ''} ({seconds:.2f} s)")
        logger.info("Apply Eraser LoRA: %s", report)
        lines = [f"{file.name}: {info.summary()}", *(f"applied {part}" if i == 0 else part
                                                       for i, part in enumerate(applied.split("; "))),
                 f"strength {strength:g}{f' x gate = {scale:.3f}' if gate == GATE_FT else ''}; {gate_line}",
                 *info.notes, f"{seconds:.2f} s"]
        bars = [] if gate_value is None else [Bar("gate", gate_value, limit=max(1.0, facilitate_factor), good="high",
                                                 text=f"{gate_value:.3f} -> x{scale:.3f}")]
        return io.NodeOutput(out_model, out_clip, report,
                             ui=report_ui(report, title=cls.DISPLAY_NAME, lines=lines, bars=bars))

    @classmethod
    def validate_inputs(cls, eraser=None, gate=None, concept_text=None) -> bool | str:
        """At queue time: the file exists in the allowed folders and, for safetensors (header only),
        is a known format; with the gate on, its concepts (typed, else the file's) are within
        MAX_GATE_CONCEPTS. Pickle-format files are checked when the node runs."""
        gated = gate == GATE_FT and isinstance(concept_text, str)

        def check() -> None:
            file_concepts, file_name = "", ""  # a linked or pickle-format eraser: its list is read when the node runs
            if eraser is not None:
                path = _comfy.resolve_eraser(eraser)
                if path.lower().endswith(SAFE_EXTENSIONS):
                    file = open_eraser(path)
                    info = describe(file.shapes, file.metadata, file.config, name=f"eraser '{file.name}'")
                    file_concepts, file_name = info.concept_text, file.name
            if gated:
                eraser_gate_targets(concept_text, file_concepts, file_name)

        return validation_message(cls.DISPLAY_NAME, check)

    @classmethod
    def fingerprint_inputs(cls, eraser=None, **_) -> object:
        """Re-run when the picked file changes on disk."""
        return _comfy.file_fingerprint(eraser, _comfy.resolve_eraser)
