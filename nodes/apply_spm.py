"""Apply SPM: concept semi-permeable membranes with Facilitated Transport, on a clone of the model."""

from __future__ import annotations

import logging

from ..erasure_core import ConceptError
from ..erasure_core.formats.spm import (
    load_spm_file,
    load_spm_metadata,
    resolve_keys,
    split_prompts,
)
from ..erasure_core.gating.ft_gate import ft_gate, gate_targets
from ..erasure_core.gating.spm_combine import PAPER, REFERENCE, combine
from . import _comfy
from ._report import Bar, report_ui
from ._schema import validation_message
from .types import io

logger = logging.getLogger(__name__)

DISPLAY_NAME = "Apply SPM"
FT, ALWAYS_ON, REFERENCE_CODE = "facilitated transport", "always on", "reference code"
MODES = (FT, ALWAYS_ON, REFERENCE_CODE)
SLOTS = 4

MODE_HELP = (
    "facilitated transport (default): each SPM acts with strength x gate, the gate computed from "
    "'prompt' as in the paper (max over the SPM's concepts of max(CLIP cosine, token overlap)); "
    "several SPMs add up (sum of m_k U_k D_k). "
    "always on: each SPM at its fixed strength, no gate (like loading it as a LoRA). "
    "reference code: the released script's arithmetic, gate applied to both LoRA factors: one SPM "
    "acts with gate^2, several as (sum m_k U_k)(sum m_k D_k)."
)


def _slot_inputs(k: int) -> list:
    return [
        io.Combo.Input(f"spm_{k}", options=_comfy.spm_file_choices(), default=_comfy.NO_FILE,
                       tooltip=f"SPM file {k} (models/spm; 'loras/...' are files from models/loras), or none."),
        io.Float.Input(f"strength_{k}", default=1.0, min=-10.0, max=10.0, step=0.05,
                       tooltip=f"Multiplier of SPM {k}: its gate is multiplied by this (in 'always on', "
                               "it is the strength itself)."),
        io.String.Input(f"concepts_{k}", default="",
                        tooltip=f"Comma-separated concept text(s) SPM {k} erases, to gate against. Empty: "
                                "the file's 'prompts' metadata. Required for a plain LoRA without it."),
    ]


class ApplySPM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_ApplySPM",
            display_name=DISPLAY_NAME,
            category="concept_erasure",
            description="Apply one or several SPM concept membranes (Lyu et al., CVPR 2024) with Facilitated "
                        "Transport: each membrane acts as strongly as the prompt resembles its erased concept, "
                        "so unrelated prompts sample like the original model. Link the SAME String node into "
                        "CLIP Text Encode and into 'prompt'. The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="Model to patch (SD1.x for the released SPMs). It is not "
                                                "changed; LoRAs applied before this node are kept."),
                io.Clip.Input("clip", tooltip="The model's text encoder: encodes the prompt and the SPM "
                                              "concepts to compute the gates."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt you sample. Link the same String (Multiline) node "
                                        "that feeds your CLIP Text Encode, so the gate follows the prompt. "
                                        "Not used in 'always on'."),
                io.Combo.Input("mode", options=list(MODES), default=FT, tooltip=MODE_HELP),
                io.Float.Input("facilitate_factor", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Scales every gate (the reference's --facilitate_factor; 1 = paper)."),
                *(inp for k in range(1, SLOTS + 1) for inp in _slot_inputs(k)),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Patched copy of the model."),
                io.String.Output(display_name="report", tooltip="Gate and strength of each SPM."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode=None, spm_1=None, spm_2=None, spm_3=None, spm_4=None, concepts_1=None,
                        concepts_2=None, concepts_3=None, concepts_4=None) -> bool | str:
        """Queue-time checks of what the widgets decide: a file is picked, each picked file exists,
        a plain LoRA (no 'prompts' metadata) has its concept typed, and no gate has over MAX_GATE_CONCEPTS
        concepts (unless 'always on')."""
        files = {1: spm_1, 2: spm_2, 3: spm_3, 4: spm_4}
        concepts = {1: concepts_1, 2: concepts_2, 3: concepts_3, 4: concepts_4}
        if mode is None or any(v is None for v in files.values()):
            return True  # a linked input: checked when the node runs

        def check() -> None:
            if mode not in MODES:
                raise ConceptError(f"mode must be one of {MODES}, but got {mode!r}.", input_name="mode")
            picked = [k for k, f in files.items() if f != _comfy.NO_FILE]
            if not picked:
                raise _no_file_error()
            for k in picked:
                path = _comfy.resolve_spm_file(files[k], f"spm_{k}")
                if mode == ALWAYS_ON or concepts[k] is None:
                    continue
                typed = split_prompts(concepts[k])
                if typed:
                    _slot_concepts(typed, (), k, files[k])
                    continue
                recorded = split_prompts(load_spm_metadata(path, files[k], input_name=f"spm_{k}").get("prompts", ""))
                if not recorded:
                    raise _needs_concept_error(files[k], k)
                _slot_concepts((), recorded, k, files[k])

        return validation_message(DISPLAY_NAME, check)

    @classmethod
    def fingerprint_inputs(cls, spm_1=None, spm_2=None, spm_3=None, spm_4=None, **_) -> object:
        """Re-run when a picked file changes on disk (ComfyUI caches on inputs otherwise)."""
        return tuple(_comfy.file_fingerprint(choice, lambda c, k=k: _comfy.resolve_spm_file(c, f"spm_{k}"))
                     for k, choice in enumerate((spm_1, spm_2, spm_3, spm_4), 1))

    @classmethod
    def execute(cls, model, clip, prompt: str, mode: str, facilitate_factor: float, **slots) -> io.NodeOutput:
        if mode not in MODES:
            raise ConceptError(f"mode must be one of {MODES}, but got {mode!r}.", input_name="mode")
        picked = [k for k in range(1, SLOTS + 1) if slots.get(f"spm_{k}", _comfy.NO_FILE) != _comfy.NO_FILE]
        if not picked:
            raise _no_file_error()
        progress = _comfy.progress_bar()
        key_map, shapes = _comfy.unet_lora_key_map(model), _comfy.unet_shapes(model)
        spms, keys, targets = [], {}, []
        for step, k in enumerate(picked):
            choice = slots[f"spm_{k}"]
            spm = load_spm_file(_comfy.resolve_spm_file(choice, f"spm_{k}"), choice, input_name=f"spm_{k}")
            keys.update(resolve_keys(spm, key_map, shapes, input_name=f"spm_{k}"))
            typed = split_prompts(slots.get(f"concepts_{k}", "") or "")
            concepts = typed or spm.prompts
            if not concepts and mode != ALWAYS_ON:
                raise _needs_concept_error(choice, k)
            if mode != ALWAYS_ON:
                concepts = _slot_concepts(typed, spm.prompts, k, choice)
            spms.append(spm)
            targets.append(concepts)
            progress(step + 1, len(picked) + 2)
        strengths = [float(slots.get(f"strength_{k}", 1.0)) for k in picked]
        lines, bars = [], []
        if mode == ALWAYS_ON:
            multipliers = strengths
            lines = [f"{spm.name}: always on, strength {s:g}" for spm, s in zip(spms, strengths, strict=True)]
            truncated = False
        else:
            if not prompt.strip():
                raise ConceptError(
                    "the prompt must be the positive prompt you sample (the gate is computed from it), but it is "
                    "empty. Link the same String (Multiline) node into CLIP Text Encode's text and into 'prompt', "
                    "or use mode 'always on'.", input_name="prompt")
            prompt_hidden, prompt_ids, special, cut = _comfy.encode_first_windows(clip, [prompt])
            truncated = cut[0]
            multipliers = []
            for spm, concepts, strength in zip(spms, targets, strengths, strict=True):
                # one SPM's concepts at a time, in chunks with progress: at most one gate's encodings held
                hidden, ids, _, _ = _comfy.encode_first_windows(clip, concepts, progress)
                gate = ft_gate(prompt_hidden[0], prompt_ids[0], hidden, list(ids), special,
                               facilitate_factor=facilitate_factor)
                multipliers.append(strength * gate.gate)
                bars.append(Bar(f"{spm.name.removesuffix('.safetensors')} gate", gate.gate, limit=max(1.0, facilitate_factor), good="high",
                                text=f"{gate.gate:.3f} -> x{strength * gate.gate:.3f}"))
                lines.append(f"{spm.name}: {gate.describe(concepts)}, strength {strength:g} -> "
                             f"multiplier {strength * gate.gate:.3f}")
        progress(len(picked) + 1, len(picked) + 2)
        factors = combine(spms, multipliers, REFERENCE if mode == REFERENCE_CODE else PAPER)
        patched = _comfy.apply_lora_factors(model, {keys[name]: f for name, f in factors.items()})
        progress(len(picked) + 2, len(picked) + 2)
        header = f"Apply SPM ({mode}): {len(spms)} SPM(s), {len(factors)} weights patched"
        if mode == REFERENCE_CODE:
            header += "; reference code: both LoRA factors scaled by m (one SPM acts with m^2)"
        if truncated:
            header += "; the prompt is longer than 75 tokens, gated on its first window (as the reference)"
        ignored = sum(len(s.ignored) for s in spms)
        if ignored:
            header += f"; {ignored} text-encoder keys ignored (SPM gates the UNet only)"
        report = "\n".join([header, *lines])
        logger.info("%s", report)
        return io.NodeOutput(patched, report, ui=report_ui(report, title=DISPLAY_NAME, lines=[header, *lines],
                                                           bars=bars))


def _slot_concepts(typed: tuple[str, ...], recorded: tuple[str, ...], k: int, choice: str) -> tuple[str, ...]:
    """SPM ``k``'s distinct gate concepts (typed, else its 'prompts' metadata), at most MAX_GATE_CONCEPTS."""
    return gate_targets(typed, recorded, f"concepts_{k}", f"spm_{k}", f"the 'prompts' metadata of '{choice}'")


def _no_file_error() -> ConceptError:
    return ConceptError("at least one SPM file must be picked, but every slot is 'none'. Put SPM files in "
                        "models/spm and pick one in spm_1.", input_name="spm_1")


def _needs_concept_error(choice: str, k: int) -> ConceptError:
    return ConceptError(
        f"'{choice}' has no 'prompts' metadata (a plain LoRA, not an SPM), so the gate needs the concept it "
        f"erases, but concepts_{k} is empty. Type the erased concept (e.g. 'Snoopy') in concepts_{k}, or use "
        "mode 'always on'.", input_name=f"concepts_{k}")
