"""Closed-Form Erase: solve new cross-attention K/V weights (UCE, SPEED, RECE) and patch a clone of the model."""

from __future__ import annotations

import dataclasses
import logging
import time

from ..erasure_core import ClosedFormConfig, ConceptSet, LazyWeight, erase, methods, node_config
from ..erasure_core.methods.check import Check, check_edit
from ..erasure_core.methods.closed_form import preserve_list
from ..erasure_core.text.encoded import TimedEncoder
from . import _comfy
from ._chart import GUIDE, check_chart
from ._report import Bar, report_ui
from ._schema import config_input
from .types import CONCEPTS, PATCH, io
from .types import OPTIONS as OPTIONS_SOCKET

logger = logging.getLogger(__name__)

DISPLAY_NAME = "Closed-Form Erase"
OPTIONS = ("token_pick", "erase_scale", "preserve_scale", "lamb", "preserve_empty_prompt", "solve_dtype",
           "preserve_bank")
CHECK_HELP = ("The check, in K/V space on the encoded prompts (0 is best): per target the share of its "
              "target-anchor gap left; per preserved prompt and per held-out probe (built-in prompts in no "
              "list) how far it moved, in units of that gap. Above 0.10 a probe visibly changes.")
CHECK_OFF = "check: off (turn 'check' on to measure the edit)"


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
                io.Boolean.Input("check", default=True, optional=True,
                                 tooltip="Measure the edit after solving it (the report's check and the check "
                                         "image). Its first run encodes ~50 prompts at every token position, "
                                         "seconds on a CPU for SD1.5 (cached after that); turn it off while "
                                         "iterating on many concepts on a CPU. Off leaves the edit unchanged."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Patched copy of the model."),
                PATCH.Output(display_name="patch", tooltip="The weight edit, for saving or re-applying."),
                io.String.Output(display_name="report", tooltip="Sites edited, rank, time and the check. "
                                                                 + CHECK_HELP),
                io.Image.Output(display_name="check", tooltip="The check as a bar chart, for Preview Image or "
                                                              "Save Image. " + CHECK_HELP),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concepts: ConceptSet, method: str, strength: float, options=None,
                check: bool = True, **widgets) -> io.NodeOutput:
        config, source = node_config(method, widgets, options)
        progress = _comfy.progress_bar()
        arch, sites = _comfy.attention_sites(model)
        reads = [0.0]  # seconds spent materialising weights (inside the solve)
        sites = [dataclasses.replace(s, weight=_timed_weight(s.weight, reads)) for s in sites]
        cache = _comfy.cached_encoder(clip, progress=progress, text_length=getattr(config, "text_length", 0))
        encoder = TimedEncoder(cache)
        started = time.perf_counter()
        patch = erase(method, sites, concepts, encoder, config, device=_comfy.compute_device(),
                      progress=progress)
        solved = time.perf_counter()
        patched = _comfy.apply_patchset(model, patch, strength)
        total = time.perf_counter() - started
        times = {"encode": encoder.seconds, "weights": reads[0],
                 "solve": solved - started - encoder.seconds - reads[0], "patch": time.perf_counter() - solved}
        hits, misses = cache.hits, cache.misses  # the erase's own prompts (the check encodes after it)
        hit_rate = f"{hits / (hits + misses):.0%}" if hits + misses else "n/a"
        checked = time.perf_counter()
        if check:
            keep = preserve_list(concepts, preserve_empty=config.preserve_empty_prompt, bank=config.preserve_bank)
            measured = check_edit(sites, patch, concepts, cache, keep, strength=strength,
                                  device=_comfy.compute_device())
            check_lines = measured.lines()
        else:
            measured, check_lines = None, [CHECK_OFF]
        check_seconds = time.perf_counter() - checked
        head = (f"{method.upper()} on {arch.display_name}: {patch.meta['sites']} sites edited, "
                f"rank {patch.meta['rank']}, {total:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in times.items())}), "
                f"strength {strength}; {misses} prompts encoded, {hits} from cache "
                f"({hit_rate} hit rate); {source}")
        lines = [f"{method.upper()} on {arch.display_name}: {patch.meta['sites']} sites edited, rank {patch.meta['rank']}, "
                 f"strength {strength}",
                 f"{total:.2f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
                 + f" (+ check {check_seconds:.2f} s)",
                 f"prompts: {misses} encoded, {hits} from cache ({hit_rate} hit rate)",
                 source, *check_lines]
        report = "\n".join([head, *check_lines])
        logger.info("Closed-Form Erase: %s", " | ".join([head, *check_lines]))
        return io.NodeOutput(patched, patch, report, _chart(method, measured),
                             ui=report_ui(report, title=DISPLAY_NAME, lines=lines,
                                          bars=_bars(measured) if measured is not None else []))


def _timed_weight(weight, reads: list[float]):
    """``weight`` with its loading time added to ``reads[0]`` (lazy ComfyUI weights only)."""
    if not isinstance(weight, LazyWeight):
        return weight

    def load():
        started = time.perf_counter()
        try:
            return weight.load()
        finally:
            reads[0] += time.perf_counter() - started

    return dataclasses.replace(weight, load=load)


def _bars(check: Check) -> list[Bar]:
    """Every target's gap left, then the worst preserved prompt and the worst probe."""
    bars = [Bar(f"gap left: {t or '(empty)'}", v, limit=1.0, text=f"{v:.3f}") for t, v in check.targets[:6]]
    for name, items in (("preserved drift", check.preserved), ("probe drift", check.probes)):
        if items:
            prompt, worst = max(items, key=lambda kv: kv[1])
            bars.append(Bar(f"{name} (worst: {prompt or '(empty)'})", worst, limit=1.0, text=f"{worst:.3f}"))
    return bars


def _chart(method: str, check: Check | None):
    if check is None:
        return check_chart(f"{method.upper()} check: off", [("target", CHECK_OFF, [])])
    worst = sorted(check.preserved, key=lambda kv: -kv[1])[:8]
    return check_chart(f"{method.upper()} check (K/V space, 0 is best; line at {GUIDE:g})", [
        ("target", "targets: share of the target-anchor gap left", check.targets),
        ("preserved", f"preserved prompts: drift (worst {len(worst)} of {len(check.preserved)})", worst),
        ("probe", "held-out probes (in no list): drift", check.probes),
    ])
