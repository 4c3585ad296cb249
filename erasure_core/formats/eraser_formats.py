"""Which eraser format a file is, from its key names, shapes and metadata alone.

Every erasure paper ships its result in its own shape (algorithms.md §11.5 and the feature
table). ``describe`` turns a file's ``{key: shape}`` and metadata into an :class:`EraserInfo`:
the format, the model family the keys look like, what it patches (UNet, text encoder), the
rank, and the concept text when the file records one. When nothing matches, the error lists the
key patterns that were found, so the user can tell what the file is.

Formats (and who writes them):

- ``PATCH``: our own PatchSet safetensors (Closed-Form Erase, Extract Eraser).
- ``KOHYA_LORA``: ``lora_unet_*`` / ``lora_te_*`` with ``.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha`` (kohya sd-scripts, A1111; SPM, ACE, LECO-style erasers).
- ``DIFFUSERS_LORA``: PEFT ``.lora_A.weight``/``.lora_B.weight`` (EraseAnything, diffusers
  ``save_lora_weights``), diffusers ``.lora.down.weight`` and the old attn-processor format
  ``.processor.to_k_lora.down.weight`` (MACE ``unet.save_attn_procs``).
- ``RECELER``: ``{block}.down.weight`` ... (Receler ``eraser_weights.pt``, a dict by diffusers block
  prefix, flattened) or ``{block}.adapter.down.weight`` (the erase-eval re-implementation).
- ``UNET_WEIGHTS``: a partial or full UNet state dict, diffusers names (ESD ``esd_sd.py``, UCE,
  SPEED, ESD paper ``diffusers-*-UNET.pt``, RECE, ANT) or LDM names (CompVis checkpoints).
- ``TEXT_ENCODER``: a CLIPTextModel state dict (AdvUnlearn, few-shot erasing).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from ..errors import KEY_CHARS, ErasureError, shown

__all__ = ["EraserFormat", "EraserInfo", "Naming", "describe", "is_dit_diffusers_key", "is_unet_key", "key_patterns",
           "model_family", "check_family", "strip_text_encoder_prefix", "RECELER_BLOCK"]


class EraserFormat(str, Enum):
    PATCH = "concept-erasure patch"
    KOHYA_LORA = "kohya LoRA"
    DIFFUSERS_LORA = "diffusers/PEFT LoRA"
    RECELER = "Receler adapters"
    UNET_WEIGHTS = "UNet weights"
    TEXT_ENCODER = "text-encoder weights"


class Naming(str, Enum):
    DIFFUSERS = "diffusers"
    LDM = "LDM"
    COMFY = "ComfyUI"


PATCH_FORMAT_NAME = "concept_erasure.patchset"  # erasure_core.edit.patch.FORMAT_NAME (kept free of imports)
RECELER_BLOCK = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
                           r"(?:\.adapter)?\.(down|up)\.(weight|bias)$")
# ``.diff`` / ``.diff_b``: full-rank modules as weight differences (LyCORIS "full", Save Erasure)
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight", ".dora_scale", ".diff",
                   ".diff_b")
_DIFFUSERS_LORA = re.compile(r"(\.lora_[AB](\.default)?\.weight|\.lora\.(down|up)\.weight|_lora\.(down|up)\.weight|"
                             r"\.lora_linear_layer\.(down|up)\.weight|\.lora_[AB]|\.alpha)$")
_LORA_DOWN = re.compile(r"(\.lora_down\.weight|\.lora_A(\.default)?\.weight|\.lora\.down\.weight|_lora\.down\.weight|"
                        r"\.lora_linear_layer\.down\.weight|\.lora_A)$")
_UNET_DIFFUSERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.",
                   "time_embedding.", "add_embedding.")
# a DiT transformer's own state dict in diffusers names (Flux's ``transformer/diffusion_pytorch_model``)
DIT_DIFFUSERS = ("transformer_blocks.", "single_transformer_blocks.", "context_embedder.", "x_embedder.",
                 "time_text_embed.", "norm_out.", "proj_out.")
_UNET_LDM = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")
_LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_TEXT_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "text_encoder.",
                  "transformer.", "te.")
_DIT_MARKERS = {"Flux": ("double_blocks", "single_blocks", "single_transformer_blocks", "lora_transformer_",
                         "txt_attn", "img_attn"),
                "SD3": ("joint_blocks", "context_block", "x_block")}
FLUX_HIDDEN = 3072


@dataclass(frozen=True)
class EraserInfo:
    """What a file is. ``keys`` counts tensors; ``rank`` is the largest LoRA/adapter rank."""

    format: EraserFormat
    family: str | None
    targets: tuple[str, ...]
    keys: int
    naming: Naming | None = None
    rank: int | None = None
    concept_text: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        parts = [self.format.value]
        if self.naming is not None:
            parts.append(f"{self.naming.value} names")
        parts.append(f"{self.keys} tensors")
        if self.rank:
            parts.append(f"rank {self.rank}")
        parts.append("for " + " + ".join(self.targets))
        if self.family:
            parts.append(f"looks like {self.family}")
        return ", ".join(parts)


def key_patterns(keys: list[str], limit: int = 8) -> str:
    """The most common key shapes, digits folded to N: ``12x down_blocks.N.attentions.N....to_q.weight``."""
    def pattern(key: str) -> str:
        parts = re.sub(r"\d+", "N", key).split(".")
        return ".".join(parts) if len(parts) <= 5 else ".".join(parts[:3] + ["…"] + parts[-2:])

    counts = Counter(pattern(k) for k in keys)
    found = [f"{n}x {p}" for p, n in counts.most_common(limit)]
    more = len(counts) - len(found)
    return "; ".join(found) + (f"; and {more} more patterns" if more > 0 else "")


def strip_text_encoder_prefix(key: str) -> str | None:
    """``text_model.…`` for a CLIPTextModel key under any known prefix, else None."""
    for prefix in ("", *_TEXT_PREFIXES):
        if key.startswith(prefix) and key[len(prefix):].startswith("text_model."):
            return key[len(prefix):]
    return None


METADATA_JSON_LIMIT = 1 << 20
"""Most characters of a metadata value that is decoded as JSON (a thousand concepts take tens of
KB); a longer value is not read for the concept text (queue time stays cheap)."""
_UNDECODED = object()


def _json_value(text: str) -> object:
    """``text`` decoded as JSON, or ``_UNDECODED`` when it is not JSON (or nests too deeply)."""
    import json

    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _UNDECODED


def _concept_text(metadata: Mapping[str, str], config: Mapping[str, object]) -> str:
    """The erased concept(s) as recorded by the trainer (SPM ``prompts``, ours ``concepts``...).
    A value longer than :data:`METADATA_JSON_LIMIT` is skipped."""
    for source in (metadata, config):
        for name in ("concept_text", "concepts", "concept", "prompts", "prompt", "target", "erased_concept"):
            value = source.get(name)
            if value is None or value == "":
                continue
            if isinstance(value, str):
                if len(value) > METADATA_JSON_LIMIT:
                    continue
                decoded = _json_value(value)
                if decoded is _UNDECODED:
                    return value.strip()
                value = decoded
            if isinstance(value, (list, tuple)):
                return "; ".join(str(_target_of(v)) for v in value)
            return str(_target_of(value)).strip()
    meta = metadata.get("meta")
    if isinstance(meta, str) and len(meta) <= METADATA_JSON_LIMIT:
        decoded = _json_value(meta)
        if isinstance(decoded, dict):
            return _concept_text({k: v for k, v in decoded.items() if isinstance(v, (str, list))}, {})
    return ""


def _target_of(value: object) -> object:
    """SPM's ``prompts`` metadata is a list of dicts with a ``target``."""
    if isinstance(value, dict):
        return value.get("target") or value.get("name") or value.get("prompt") or ""
    return value


def _family(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    joined = "\n".join(keys)
    for family, markers in _DIT_MARKERS.items():
        if any(m in joined for m in markers):
            return family
    dit = [k for k in keys if re.search(r"transformer_blocks\.\d+\.(attn\.add_[qkv]_proj|ff_context)", k)]
    if dit:
        widths = {s for k in dit for s in shapes[k] if len(shapes[k]) == 2}
        if FLUX_HIDDEN in widths:
            return "Flux"  # (Qwen-Image is 3072 wide too; check_family does not refuse on Qwen-Image models)
        # SD3 medium / 3.5 medium 1536, SD3.5 large 2432; other widths: let the LoRA key map decide
        return "SD3" if widths & {1536, 2432} else None
    if any(m in joined for m in ("add_embedding.", "label_emb.", "lora_te2_", "text_encoder_2.", "conditioner.")):
        return "SDXL"
    width = _context_width(keys, shapes)
    if width is not None:
        return {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(width, f"an unknown model (text width {width})")
    text_width = _text_width(keys, shapes)
    if text_width is not None:
        return {768: "SD1", 1024: "SD2", 1280: "SDXL"}.get(text_width, f"an unknown model (CLIP width {text_width})")
    if re.search(r"(up_blocks|output_blocks)\.\d+\.attentions\.\d+\.transformer_blocks\.[2-9]", joined) or \
            re.search(r"transformer_blocks_[2-9]", joined):
        return "SDXL"
    return None


def _context_width(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The text width the cross-attention keys read: in-dim of ``attn2.to_k`` (or its LoRA down)."""
    for key in keys:
        flat = key.replace("_", ".")
        if "attn2" in flat and ("to.k" in flat) and len(shapes[key]) == 2:
            if "up" in key.split(".")[-2] or "lora_B" in key or ".up." in key or key.endswith(".lora_up"):
                continue
            return int(shapes[key][1])
    return None


def _text_width(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key in keys:
        if key.endswith(("token_embedding.weight", "q_proj.weight")) and len(shapes[key]) == 2:
            return int(shapes[key][1])
        if "self_attn_q_proj" in key and _LORA_DOWN.search(key) and len(shapes[key]) == 2:
            return int(shapes[key][1])
    return None


def _lora_rank(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    ranks = [int(shapes[k][0]) for k in keys if _LORA_DOWN.search(k) and shapes[k]]
    return max(ranks) if ranks else None


def _lora_targets(keys: list[str]) -> tuple[str, ...]:
    text = any(k.startswith(("lora_te", "text_encoder", "te.", "te1", "te2")) or "text_model" in k for k in keys)
    unet = any(not (k.startswith(("lora_te", "text_encoder", "te.")) or "text_model" in k) for k in keys)
    return tuple(t for t, on in (("unet", unet), ("text encoder", text)) if on)


def is_dit_diffusers_key(key: str) -> bool:
    """A DiT transformer's weight in diffusers names (``transformer_blocks.0.attn.to_q.weight``, with or
    without ``transformer.``)."""
    return key.removeprefix("transformer.").startswith(DIT_DIFFUSERS)


def _is_unet_diffusers_key(key: str) -> bool:
    return key.removeprefix("unet.").startswith(_UNET_DIFFUSERS)


def is_unet_key(key: str, info: EraserInfo) -> bool:
    """Whether ``key`` of a file :func:`describe` read as ``info`` is a model (UNet or DiT) weight: by
    the naming it found (diffusers' blocks, a DiT's transformer, or ComfyUI/LDM names)."""
    if info.naming is Naming.DIFFUSERS:
        if "transformer" in info.targets:  # a DiT's own state dict (Flux's transformer in diffusers names)
            return is_dit_diffusers_key(key)
        return _is_unet_diffusers_key(key)
    return key.startswith(_LDM_PREFIXES) or key.removeprefix("model.").removeprefix("diffusion_model.").startswith(
        _UNET_LDM)


def _check_ndim(name: str, shapes: Mapping[str, tuple[int, ...]], keys: list[str], ndim: int,
               input_name: str) -> None:
    """Refuse the first of ``keys`` whose header shape is not ``ndim``-D (a broken or forged file)."""
    for key in keys:
        if len(shapes[key]) != ndim:
            raise ErasureError(f"{name} must hold {ndim}-D matrices for its weights, but {shown(key, KEY_CHARS)} has shape "
                               f"{tuple(shapes[key])}. The file is broken: re-download or re-save it.",
                               input_name=input_name)


def describe(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None,
             config: Mapping[str, object] | None = None, *, name: str = "the file",
             input_name: str = "eraser") -> EraserInfo:
    """Detect the format of a file from ``{key: shape}``, safetensors ``metadata`` and a sidecar
    ``config`` (Receler's ``eraser_config.json``). Raises ErasureError listing the key patterns
    when no format matches, naming the file as ``name`` and blaming the node input ``input_name``."""
    metadata, config = dict(metadata or {}), dict(config or {})
    keys = list(shapes)
    if not keys:
        raise ErasureError(f"{name} must contain weight tensors, but it has none.", input_name=input_name)
    concept = _concept_text(metadata, config)
    family = _family(keys, shapes)

    if metadata.get("format") == PATCH_FORMAT_NAME:
        _check_ndim(name, shapes, [k for k in keys if k.endswith((".lora_up", ".lora_down", ".diff"))], 2,
                    input_name)
        ranks = [int(shapes[k][1]) for k in keys if k.endswith(".lora_up")]
        return EraserInfo(EraserFormat.PATCH, family, ("unet",), len(keys), Naming.COMFY,
                          max(ranks) if ranks else None, concept)

    if all(k.endswith(_KOHYA_SUFFIXES) for k in keys) and any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return EraserInfo(EraserFormat.KOHYA_LORA, family, _lora_targets(keys), len(keys), None,
                          _lora_rank(keys, shapes), concept)

    if any(_LORA_DOWN.search(k) for k in keys) and all(_DIFFUSERS_LORA.search(k) or k.endswith(_KOHYA_SUFFIXES)
                                                       for k in keys):
        return EraserInfo(EraserFormat.DIFFUSERS_LORA, family, _lora_targets(keys), len(keys), None,
                          _lora_rank(keys, shapes), concept)

    if all(RECELER_BLOCK.match(k) for k in keys) or (config.get("eraser_type") == "adapter" and
                                                     any(RECELER_BLOCK.match(k) for k in keys)):
        downs = [k for k in keys if k.endswith("down.weight")]
        _check_ndim(name, shapes, [k for k in keys if RECELER_BLOCK.match(k) and k.endswith(".weight")], 2,
                    input_name)
        ranks = [int(shapes[k][0]) for k in downs]
        widths = {int(shapes[k][1]) for k in downs}
        # SD1.x/SD2.x blocks are 320/640/1280 wide; SDXL has no 320-wide attention.
        fam = family or ("SDXL" if widths and min(widths) >= 640 and not any(k.startswith("down_blocks.0.")
                                                                            for k in downs) else "SD1/SD2")
        return EraserInfo(EraserFormat.RECELER, fam, ("unet (attention output)",), len(keys), Naming.DIFFUSERS,
                          max(ranks) if ranks else None, concept)

    text_keys = [k for k in keys if strip_text_encoder_prefix(k)]
    if text_keys and len(text_keys) >= 0.9 * len(keys):
        # CLIP-L (768) is SD1.x's encoder and also SDXL's first one
        fam = "SD1/SDXL" if family == "SD1" else family
        notes = (f"{len(keys) - len(text_keys)} tensors outside text_model ignored",) if len(text_keys) < len(keys) \
            else ()
        return EraserInfo(EraserFormat.TEXT_ENCODER, fam, ("text encoder",), len(text_keys), Naming.DIFFUSERS,
                          None, concept, notes)

    unet_diffusers = [k for k in keys if _is_unet_diffusers_key(k)]
    # detection counts only prefixed or bare LDM names; is_unet_key also takes "model.<block>" when
    # selecting the keys of a file detected as LDM
    unet_ldm = [k for k in keys if k.startswith(_LDM_PREFIXES) or k.startswith(_UNET_LDM)]
    dit_diffusers = [k for k in keys if is_dit_diffusers_key(k)]
    if dit_diffusers and len(dit_diffusers) > max(len(unet_diffusers), len(unet_ldm)):
        notes = (f"{len(keys) - len(dit_diffusers)} non-transformer tensors ignored",) \
            if len(dit_diffusers) < len(keys) else ()
        return EraserInfo(EraserFormat.UNET_WEIGHTS, family, ("transformer",), len(dit_diffusers), Naming.DIFFUSERS,
                          None, concept, notes)
    if unet_diffusers and len(unet_diffusers) >= len(unet_ldm):
        notes = ()
        if len(unet_diffusers) < len(keys):
            notes = (f"{len(keys) - len(unet_diffusers)} non-UNet tensors ignored",)
        return EraserInfo(EraserFormat.UNET_WEIGHTS, family, ("unet",), len(unet_diffusers), Naming.DIFFUSERS,
                          None, concept, notes)
    if unet_ldm:
        notes = ()
        others = len(keys) - len(unet_ldm) - len(text_keys)
        if others:
            notes = (f"{others} tensors outside the UNet and text encoder ignored (VAE...)",)
        targets = ("unet", "text encoder") if text_keys else ("unet",)
        return EraserInfo(EraserFormat.UNET_WEIGHTS, family, targets, len(unet_ldm) + len(text_keys), Naming.LDM,
                          None, concept, notes)

    raise ErasureError(
        f"{name} must be an eraser in a known format (kohya/A1111 LoRA, diffusers/PEFT LoRA, Receler "
        f"adapters, UNet or DiT weights with diffusers or LDM/ComfyUI names, a CLIPTextModel state dict, or a "
        f"concept-erasure patch), but its {len(keys)} keys match none of them. Found: "
        f"{key_patterns(keys)}."
        + (f" The keys look like {family}." if family else ""),
        input_name=input_name)


_MODEL_FAMILIES = {"SD15": "SD1", "SD20": "SD2", "SD21UnclipL": "SD2", "SD21UnclipH": "SD2", "SDXL": "SDXL",
                   "SSD1B": "SDXL", "Segmind_Vega": "SDXL", "SDXLRefiner": "SDXL", "SD3": "SD3", "Flux": "Flux",
                   "FluxSchnell": "Flux"}


def model_family(config_class_name: str) -> str:
    """Our family name for ComfyUI's model-config class name (``SD15`` -> ``SD1``)."""
    if config_class_name in _MODEL_FAMILIES:
        return _MODEL_FAMILIES[config_class_name]
    if config_class_name.startswith("KOALA"):
        return "SDXL"
    return config_class_name


def check_family(info: EraserInfo, model_family_name: str, name: str = "the eraser", *,
                 input_name: str = "eraser") -> None:
    """Refuse an eraser whose keys clearly belong to another model family than the MODEL's, naming
    the file as ``name`` and blaming the node input ``input_name``."""
    fam = info.family
    if fam is None or model_family_name not in ("SD1", "SD2", "SDXL", "SD3", "Flux"):
        return
    compatible = set(fam.split("/"))
    if model_family_name not in compatible and not fam.startswith("an unknown"):
        raise ErasureError(
            f"{name} must be made for the connected {model_family_name} model, but its keys look like "
            f"{fam} ({info.summary()}). Connect a {fam} model, or pick the {input_name} released for "
            f"{model_family_name}.", input_name=input_name)
