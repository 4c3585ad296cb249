"""Attack Prompt: red-team an erased model in the same graph (closed_form, concept_vector, soft_prompt)."""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from ..erasure_core import ConceptError, ConfigError
from ..erasure_core.architectures import parse_layer_stream
from ..erasure_core.attacks import (
    closed_form_attack,
    concept_direction,
    genetic_search,
    kv_grams,
    layer_site_groups,
    recovery_from_distances,
)
from ..erasure_core.attacks.config import AttackConfig, AttackMode, check_prompt_size, parse_pairs
from ..erasure_core.attacks.recovery import Recovery, kv_recovery, token_sites
from . import _comfy
from ._report import Bar, report_ui
from ._schema import config_input, validation_message
from .types import io

logger = logging.getLogger(__name__)

DISPLAY_NAME = "Attack Prompt"
OPTIONS = ("mode", "random_seed", "reg", "strength", "search_steps", "search_tokens", "search_population",
           "prefix_tokens", "steps", "lr", "noise_samples")
NO_ORIGINAL = "connect original_model to score recovery"


def _recovery_bars(kv: Recovery | None, noise: Recovery | None) -> list[Bar]:
    """Recovery as bars on the node: 1 = the attack brings the concept fully back (bad for the
    erasure), 0 = it does not move the erased model toward it."""
    bars = [Bar("K/V recovery", kv.score if kv is not None else math.nan, good="low",
                text="" if kv is not None else "n/a (no original_model)")]
    if noise is not None:
        bars.append(Bar("noise recovery", noise.score, good="low"))
    return bars


class AttackPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CE_AttackPrompt",
            display_name=DISPLAY_NAME,
            category="concept_erasure",
            description="Red-team an erased model: a conditioning (and, where the mode gives one, a prompt) that "
                        "tries to bring the erased concept back, with a recovery score. Sample it with "
                        "KSampler on the erased model to see whether the concept returns.",
            inputs=[
                io.Model.Input("model", tooltip="The erased model to attack (e.g. from Closed-Form Erase). "
                                                "It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder of this model: the concept, carrier and pairs "
                                              "are encoded with it, as your prompts are."),
                io.String.Input("concept", default="", tooltip="The erased concept as a prompt, e.g. 'Van Gogh' "
                                "or 'a painting by Van Gogh'. The attack tries to make the erased model respond "
                                "as the original responded to this prompt."),
                *(config_input(AttackConfig, name) for name in OPTIONS),
                io.String.Input("carrier", default="", tooltip="concept_vector: the prompt the concept direction "
                                "is added to (e.g. a scene without the concept). Empty: the empty prompt."),
                io.String.Input("pairs", default="", multiline=True, tooltip="concept_vector: one pair per line, "
                                "'prompt with the concept | the same prompt without it'. Empty: the concept "
                                "against the empty prompt. More pairs give a cleaner direction."),
                io.String.Input("save_embedding", default="", tooltip="soft_prompt: also save the learned prefix "
                                "as models/embeddings/<name>.safetensors, usable as 'embedding:<name>' in any "
                                "prompt. Empty: do not save."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing embedding file of that "
                                 "name. Off: refuse."),
                io.Model.Input("original_model", optional=True, tooltip="The model before erasure (the same "
                               "checkpoint). Needed by closed_form and soft_prompt, and to score recovery."),
                io.Latent.Input("latent", optional=True, tooltip="soft_prompt: a latent of the concept (e.g. a "
                                "KSampler output of the original model) to noise; without it, noised zeros at "
                                "64x64 (512 px)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="Sample this with KSampler on the "
                                       "erased model."),
                io.String.Output(display_name="prompt", tooltip="A readable prompt, where the mode yields one "
                                 "(concept_vector with search, soft_prompt); empty otherwise (see the report)."),
                io.Float.Output(display_name="recovery", tooltip="Share of the erased-vs-original gap in "
                                "cross-attention K/V output the attack closes: 1 = full recovery, 0 = none, "
                                "NaN without original_model."),
                io.Float.Output(display_name="noise_recovery", tooltip="soft_prompt: the same share in "
                                "noise-prediction space over the sampled timesteps; NaN for other modes."),
                io.String.Output(display_name="report", tooltip="What was done, the scores and how long it took."),
            ],
        )

    @classmethod
    def validate_inputs(cls, save_embedding=None, mode=None, concept=None, carrier=None, pairs=None) -> bool | str:
        """The embedding name and the typed texts' sizes, at queue time (cheap whatever their size:
        the pairs are parsed only under their character limit; nothing is touched)."""
        def check() -> None:
            for name, text in (("concept", concept), ("carrier", carrier)):
                if isinstance(text, str):
                    check_prompt_size(text, name)
            if mode == AttackMode.CONCEPT_VECTOR.value and isinstance(pairs, str):
                parse_pairs(pairs, "")
            if save_embedding and save_embedding.strip():
                _comfy.check_file_name(save_embedding, ".safetensors", "vangogh_attack", ConfigError,
                                       "save_embedding")

        return validation_message(DISPLAY_NAME, check)

    @classmethod
    def execute(cls, model, clip, concept: str, carrier: str, pairs: str, save_embedding: str, overwrite: bool,
                original_model=None, latent=None, **widgets) -> io.NodeOutput:
        started = time.perf_counter()
        config = AttackConfig(**widgets)
        check_prompt_size(concept, "concept")
        check_prompt_size(carrier, "carrier")
        concept = concept.strip()
        if not concept:
            raise ConceptError("concept must name the erased concept, but it is empty. Type the concept as "
                               "a prompt, e.g. 'Van Gogh'.", input_name="concept")
        mode = config.mode
        if mode is not AttackMode.CONCEPT_VECTOR and original_model is None:
            raise ConfigError(f"{mode.value} needs the model before erasure, but original_model is not "
                              "connected. Connect the checkpoint's MODEL there.", input_name="original_model")
        if mode is AttackMode.SOFT_PROMPT:
            _comfy.check_latent(model, latent)  # before any work
        notes: list[str] = []
        embedding_file = None
        if save_embedding.strip():
            if mode is AttackMode.SOFT_PROMPT:
                embedding_file = _comfy.embedding_path(save_embedding, overwrite)  # checked before any work
            else:
                notes.append(f"save_embedding is used by soft_prompt only; nothing saved in {mode.value}")
        pair_list = parse_pairs(pairs, concept) if mode is AttackMode.CONCEPT_VECTOR else []  # before any encoding
        progress = _comfy.progress_bar()
        concept_cond, concept_pooled, concept_layers, extra = _comfy.encode_text_layers(clip, concept)
        grams = arch = None
        layer_grams = {}  # (source, k) -> grams of the sites reading layer k of that encoder (HiDream's Llama)
        read = lambda rows: rows  # noqa: E731  (conditioning rows -> what the sites read)
        if original_model is not None:
            arch, sites_e, sites_o = _comfy.kv_sites_pair(model, original_model)
            if mode is AttackMode.SOFT_PROMPT and arch.inputs:
                raise ConfigError(
                    f"soft_prompt optimises a prompt prefix through a differentiable CLIP and a UNet, but the model "
                    f"is {arch.display_name}, whose text encoder and transformer it cannot differentiate. Use "
                    "closed_form or concept_vector on DiT models.", input_name="mode")
            groups, originals = layer_site_groups(sites_e), layer_site_groups(sites_o)
            streams = {stream: parse_layer_stream(stream) for stream in groups}
            for source, _ in streams.values():  # refused before any Gram is taken
                if source not in concept_layers:
                    raise ConfigError(f"the model reads the '{source}' text encoder's per-layer states, but the clip "
                                      f"returns none. Connect the CLIP loaded for this model (with its {source}).",
                                      input_name="clip")
            for stream, group in groups.items():
                layer_grams[streams[stream]] = kv_grams(group, originals.get(stream, []),
                                                        device=_comfy.compute_device())
            (sites_e, read), (sites_o, _) = token_sites(sites_e), token_sites(sites_o)
            grams = kv_grams(sites_e, sites_o, device=_comfy.compute_device(), progress=progress)
            if concept_cond.shape[-1] != grams.width:
                raise ConfigError(f"clip must produce the width the model reads ({grams.width}), but it "
                                  f"produces {concept_cond.shape[-1]}. Connect this checkpoint's CLIP.",
                                  input_name="clip")
        noise: Recovery | None = None
        prompt = ""
        layers = concept_layers
        if mode is AttackMode.CLOSED_FORM:
            cond, pooled = closed_form_attack(read(concept_cond), grams, config.reg), concept_pooled
            layers = {name: states.clone() for name, states in concept_layers.items()}
            for (source, k), g in layer_grams.items():  # each Llama layer its own preimage (HiDream)
                layers[source][k] = closed_form_attack(concept_layers[source][k], g, config.reg)
            if layer_grams:
                notes.append(f"{len(layer_grams)} per-layer text streams attacked each on its own rows")
            if arch is not None and any(i.norm is not None for i in arch.inputs):
                notes.append(f"{arch.display_name} normalises each text row before its projection: the attack's "
                             "rows are read after that normalisation, so recovery is below the UNet case")
            notes.append("closed_form gives an embedding, not tokens: the prompt output is empty")
        elif mode is AttackMode.CONCEPT_VECTOR:
            cond, pooled, prompt, layers, extra = cls._concept_vector(clip, carrier, pair_list, config, progress,
                                                                      notes)
        else:
            out = _comfy.soft_prompt_attack(
                model, original_model, clip, concept, prefix_tokens=config.prefix_tokens, steps=config.steps,
                lr=config.lr, seed=config.random_seed, noise_samples=config.noise_samples, latent=latent,
                progress=progress)
            cond, pooled, prompt, layers, extra = out["cond"], out["pooled"], out["text"], {}, {}
            noise = recovery_from_distances(*out["eps"], "noise prediction")
            losses = out["losses"]
            notes.append(f"soft_prompt loss {losses[0]:.4g} -> {losses[out['best_step']]:.4g} (best of "
                         f"{len(losses) - 1} steps); the prompt is the nearest-token projection of the "
                         "prefix (approximate; the conditioning uses the exact embeddings)")
            if embedding_file is not None:
                _comfy.save_embedding(embedding_file, out["embedding_key"], out["prefix"],
                                      {"concept": concept, "mode": mode.value, "seed": str(config.random_seed)})
                name = os.path.splitext(os.path.basename(embedding_file))[0]
                notes.append(f"saved embedding:{name}")
        more = [(g, layers[src][k], concept_layers[src][k]) for (src, k), g in layer_grams.items()]
        kv = kv_recovery(grams, read(cond), read(concept_cond), more) if grams is not None else None
        if grams is not None and grams.identical_weights:
            notes.append("the two models' cross-attention K/V weights are identical: nothing was erased there "
                         "(an erasure of other layers is not seen by this score or by closed_form)")
        report = cls._report(mode, arch, kv, noise, notes, time.perf_counter() - started)
        logger.info("Attack Prompt: %s", report)
        return io.NodeOutput(_comfy.conditioning(cond, pooled, layers, extra), prompt,
                             kv.score if kv is not None else math.nan,
                             noise.score if noise is not None else math.nan, report,
                             ui=report_ui(report, title=DISPLAY_NAME, lines=report.split("\n"),
                                          bars=_recovery_bars(kv, noise)))

    @staticmethod
    def _concept_vector(clip, carrier, pair_list, config, progress, notes):
        if config.search_steps > 0 and not _comfy.is_unet_clip(clip):
            raise ConfigError("concept_vector's token search needs one CLIP vocabulary shared by every text "
                              "stream (SD1.x, SD2.x, SDXL), but this text encoder has others (T5, an LLM). Set "
                              "search_steps to 0: the conditioning is then the continuous target.",
                              input_name="search_steps")
        texts = [(p, "pairs") for p, _ in pair_list] + [(q, "pairs") for _, q in pair_list] + [(carrier, "carrier")]
        encoded = []
        for done, (text, input_name) in enumerate(texts):  # one CLIP call each: the bar moves, Cancel stops it
            progress(done, len(texts))
            encoded.append(_comfy.encode_text_layers(clip, text, input_name))
        progress(len(texts), len(texts))
        n = len(pair_list)
        with_c, without = encoded[:n], encoded[n : 2 * n]
        carrier_cond, carrier_pooled, carrier_layers, carrier_extra = encoded[-1]
        encodings = [*with_c, *without, (carrier_cond, None, carrier_layers, {})]
        shapes = {(tuple(c.shape), *((n, tuple(t.shape)) for n, t in sorted(ls.items()))) for c, _, ls, _ in encodings}
        if len(shapes) > 1:
            raise ConceptError("concept_vector adds a direction row by row, so the pairs and the carrier must "
                               "encode to one length, but they do not (a CLIP window is 77 tokens; T5 pads to "
                               "its minimum length; LLM encoders such as Qwen's or Gemma's do not pad). Use "
                               "prompts of one token length, or closed_form.", input_name="carrier")
        direction = concept_direction(torch.stack([e[0] for e in with_c]), torch.stack([e[0] for e in without]))
        target = carrier_cond + config.strength * direction
        layers = {}  # per-layer states (HiDream's Llama) moved along their own direction, every layer at once
        for name, states in carrier_layers.items():
            shape = states.shape
            flat = [torch.stack([e[2][name].reshape(-1, shape[-1]) for e in part]) for part in (with_c, without)]
            layers[name] = states + config.strength * concept_direction(*flat).reshape(shape)
        notes.append(f"concept direction from {len(pair_list)} pair(s), strength {config.strength}")
        if config.search_steps == 0:
            notes.append("no token search (search_steps 0): the conditioning is the continuous target and "
                         "the prompt output is empty")
            return target, carrier_pooled, "", layers, carrier_extra
        space = _comfy.ClipTokenSpace(clip)
        length = min(config.search_tokens, space.max_length)
        result = genetic_search(target, space.encode_ids, space.vocabulary, length=length,
                                generations=config.search_steps, population=config.search_population,
                                seed=config.random_seed, progress=progress)
        prompt = space.decode(result.ids.tolist())
        notes.append(f"token search: {len(result.history) - 1} generations, {result.evaluations} encodings, "
                     f"objective {result.history[0]:.4g} -> {result.objective:.4g}")
        if not prompt:
            notes.append("this CLIP has no readable vocabulary: the conditioning is the searched tokens'")
            return space.encode_ids(result.ids[None])[0], carrier_pooled, "", {}, {}
        cond, pooled = _comfy.encode_text(clip, prompt, "concept")
        typed = float(((cond - target) ** 2).sum())
        notes.append(f"the prompt, typed, scores {typed:.4g} (tokenising its text may merge tokens)")
        return cond, pooled, prompt, {}, {}

    @staticmethod
    def _report(mode, arch, kv, noise, notes, seconds) -> str:
        where = f" on {arch.display_name}" if arch is not None else ""
        lines = [f"{mode.value}{where}, {seconds:.2f} s"]
        lines.append(kv.describe() if kv is not None else f"recovery: NaN ({NO_ORIGINAL})")
        if noise is not None:
            lines.append(noise.describe())
        lines += notes
        return "\n".join(lines)
