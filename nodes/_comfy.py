"""Every ComfyUI internal the pack touches: reading weights, encoding text, applying patches,
progress. Nothing else in the pack imports comfy.*; the core never does."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import comfy.lora
import comfy.model_management
import comfy.sd1_clip
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter import LoRAAdapter

from ..erasure_core import (
    ArchitectureError,
    ArchSpec,
    AttentionSite,
    ConceptError,
    ConfigError,
    EncodedText,
    LazyWeight,
    PatchError,
    PatchSet,
    Progress,
    detect,
)
from ..erasure_core.adapters import Adapter
from ..erasure_core.attacks import (
    decode_bpe_tokens,
    draw_noise_samples,
    eps_from_denoised,
    nearest_tokens,
    optimise_prefix,
)
from ..erasure_core.clip_text import BPETokenizer
from ..erasure_core.concept_files import FILE_EXTENSIONS
from ..erasure_core.encoding_cache import CachedEncoder
from ..erasure_core.eraser_files import EraserFile
from ..erasure_core.eraser_formats import Naming, model_family, strip_text_encoder_prefix
from ..erasure_core.errors import ErasureError
from ..erasure_core.extract import WeightDiff, weight_differences

logger = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model."


def compute_device() -> torch.device:
    """The device ComfyUI computes on (the user's GPU, or the CPU under --cpu)."""
    return comfy.model_management.get_torch_device()


def attention_sites(model: Any, device: torch.device | None = None) -> tuple[ArchSpec, list[AttentionSite]]:
    """The model's architecture and its K/V sites, weights *as this MODEL would use them*.

    Reads the unpatched base weight (the backup when a patched clone is loaded) and applies the
    patches already on this clone (LoRAs, earlier erasures), so edits compose in graph order.
    Weights are materialised one at a time when the method asks (``LazyWeight``), so the device
    never holds more than one fp32 copy. The input model is only read.
    """
    device = device or compute_device()
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    spec = detect(shapes)
    keys = spec.site_keys(shapes)
    key_patches = model.get_key_patches(UNET_PREFIX)
    sites = [AttentionSite(key, LazyWeight(shapes[key], _effective_weight(key_patches[key], key, device)))
             for key in keys]
    return spec, sites


def _effective_weight(key_patches: list[Any], key: str, device: torch.device) -> Callable[[], torch.Tensor]:
    """A loader of one weight in float32 on ``device``: base weight, then this clone's patches."""

    def load() -> torch.Tensor:
        (base, convert), *patches = key_patches
        weight = comfy.model_management.cast_to_device(base, device, torch.float32, copy=True)
        weight = convert(weight, inplace=True)
        return comfy.lora.calculate_weight(patches, weight, key) if patches else weight

    return load


def apply_patchset(model: Any, patch: PatchSet, strength: float) -> Any:
    """A clone of ``model`` with ``patch`` added at ``strength``; the input is not modified.

    Low-rank entries become ComfyUI LoRA adapters, dense ones ``diff`` patches. ComfyUI drops
    unknown keys silently, so any key it did not accept raises PatchError (before the clone is
    returned, so nothing downstream sees a half-applied edit).
    """
    patches: dict[str, Any] = {}
    for key, entry in patch.entries.items():
        if entry.is_low_rank:
            patches[key] = LoRAAdapter(set(), (entry.up, entry.down, None, None, None, None))
        else:
            patches[key] = ("diff", (entry.diff,))
    clone = model.clone()
    added = set(clone.add_patches(patches, strength))
    missing = sorted(set(patches) - added)
    if missing:
        raise PatchError(
            f"the patch must fit the connected model, but {len(missing)} of {len(patches)} keys "
            f"are not in it (first: '{missing[0]}'). Apply the patch to the architecture it was "
            "made for.",
            input_name="model",
        )
    logger.debug("applied %d patch keys at strength %s", len(added), strength)
    return clone


class ComfyClipEncoder:
    """The user's CLIP as a core ``TextEncoder``: same tokenizer, weights syntax, layer choice and
    CLIP patches as their prompts. Prompts are encoded in batches of 77-token windows."""

    def __init__(self, clip: Any, batch_size: int = 32, progress: Progress | None = None):
        self.clip = clip
        self.batch_size = batch_size
        self.progress = progress

    def _windows(self, text: str) -> dict[str, list[Any]]:
        tokens = self.clip.tokenize(text)
        for windows in tokens.values():
            if len(windows) != 1:
                raise ConceptError(
                    f"each concept must fit in one 75-token CLIP window, but '{_short(text)}' "
                    f"needs {len(windows)}. Shorten the concept (or its template).",
                    input_name="concepts",
                )
        return {name: windows[0] for name, windows in tokens.items()}

    def __call__(self, texts: Sequence[str]) -> EncodedText:
        texts = list(texts)
        empty = self._windows("")
        stream = next(iter(empty))
        end_id = empty[stream][1][0]  # [start, end, pad...]: the end-of-text id
        windows = [self._windows(t) for t in texts]
        eot = []
        for text, w in zip(texts, windows, strict=True):
            ids = [tok[0] for tok in w[stream]]
            found = [j for j, tok in enumerate(ids) if j > 0 and isinstance(tok, int) and tok == end_id]
            if not found:
                raise ConceptError(f"'{_short(text)}' has no end-of-text token after tokenising; "
                                   "shorten the concept.", input_name="concepts")
            eot.append(found[0])
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = windows[start : start + self.batch_size]
            tokens = {name: [w[name] for w in batch] for name in batch[0]}
            cond = self.clip.encode_from_tokens(tokens)  # [1, 77 * n, D]: windows concatenated
            chunks.append(cond.reshape(len(batch), -1, cond.shape[-1]).float())
            if self.progress is not None:
                self.progress(min(start + self.batch_size, len(texts)), len(texts))
        hidden = torch.cat(chunks) if chunks else torch.zeros(0, len(empty[stream]), 1)
        ids = torch.tensor([[tok[0] if isinstance(tok[0], int) else -1 for tok in w[stream]] for w in windows],
                           dtype=torch.long).reshape(len(texts), -1)
        return EncodedText(tuple(texts), hidden, torch.tensor(eot, dtype=torch.long), token_ids=ids)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def clip_fingerprint(clip: Any) -> str:
    """A key that changes whenever ``clip`` would encode differently: its class, the selected
    layer, samples of its weights and every patch on it (CLIP LoRAs)."""
    digest = hashlib.sha256()
    model = clip.cond_stage_model
    digest.update(f"{type(model).__name__}|{getattr(clip, 'layer_idx', None)}".encode())
    state = model.state_dict()
    names = sorted(state)
    for name in names[:: max(1, len(names) // 16)]:
        digest.update(name.encode())
        digest.update(state[name].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    for key in sorted(clip.patcher.patches):
        digest.update(key.encode() if isinstance(key, str) else repr(key).encode())
        for patch in clip.patcher.patches[key]:
            digest.update(repr((patch[0], patch[2], type(patch[1]).__name__)).encode())
            for tensor in _tensors(patch[1]):
                digest.update(repr((tuple(tensor.shape), float(tensor.float().sum()))).encode())
    return digest.hexdigest()[:24]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return _tensors(getattr(value, "weights", ())) if hasattr(value, "weights") else []


def cached_encoder(clip: Any, progress: Progress | None = None) -> CachedEncoder:
    """The user's CLIP as a TextEncoder whose encodings persist in ComfyUI's user folder, so a
    large preserve set is encoded once per text encoder."""
    folder = os.path.join(folder_paths.get_user_directory(), "concept_erasure", "encodings")
    return CachedEncoder(ComfyClipEncoder(clip, progress=progress), folder, clip_fingerprint(clip))


def progress_bar() -> Progress:
    """A ``progress(done, total)`` callback that drives ComfyUI's bar and honours Cancel.

    Each phase (encoding, then the sites) reports against its own total.
    """
    bar = comfy.utils.ProgressBar(1)

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


# -- concept files --------------------------------------------------------------------------------

CONCEPTS_FOLDER = "concepts"
INPUT_PREFIX = "input/"
NO_FILE = "none"


def model_folder(name: str, extensions: Sequence[str]) -> list[str]:
    """The ``models/<name>`` folders, registered with ComfyUI on first use (extra_model_paths may
    add more)."""
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))
    return folder_paths.get_folder_paths(name)


def file_inside(roots: Sequence[str], relative: str) -> str | None:
    """The file ``relative`` under the first of ``roots`` that holds it, or None. A path that
    leaves its root (``..``, links pointing out) is never returned."""
    for root in roots:
        base = os.path.realpath(root)
        path = os.path.realpath(os.path.join(root, relative))
        if os.path.commonpath([path, base]) != base:
            return None
        if os.path.isfile(path):
            return path
    return None


def file_fingerprint(choice: str | None, resolve: Callable[[str], str | None]) -> object:
    """``choice`` with its file's modification time, for ``fingerprint_inputs``: ComfyUI caches a
    node on its inputs, so without this an edited file would not be read again. A choice that does
    not resolve fingerprints as itself (``execute`` raises the clear error)."""
    try:
        path = resolve(choice) if choice else None
    except ErasureError:
        path = None
    return (choice, os.stat(path).st_mtime_ns) if path else choice


def plain_save_path(folder: str, filename: str, suffix: str, example: str, error: type[ErasureError]) -> str:
    """``folder/filename`` (``suffix`` added when missing) for a node that writes a file: a plain
    name, no sub-paths or hidden files; ``error`` names the ``filename`` input otherwise."""
    name = filename.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise error(f"filename must be a plain file name (no folders), but got '{filename}'. Type a name "
                    f"such as '{example}'.", input_name="filename")
    if not name.lower().endswith(suffix):
        name += suffix
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def concepts_folders() -> list[str]:
    """The ``models/concepts`` folders."""
    return model_folder(CONCEPTS_FOLDER, FILE_EXTENSIONS)


def concept_file_choices() -> list[str]:
    """``none``, the concept files in ``models/concepts``, then those in ComfyUI's input folder."""
    concepts_folders()
    listed = [f for f in folder_paths.get_filename_list(CONCEPTS_FOLDER) if f.lower().endswith(FILE_EXTENSIONS)]
    inputs = []
    root = folder_paths.get_input_directory()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        inputs += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
                   for f in files if f.lower().endswith(FILE_EXTENSIONS)]
    return [NO_FILE, *sorted(listed), *(INPUT_PREFIX + f for f in sorted(inputs))]


def resolve_concept_file(choice: str) -> str | None:
    """The path of a file picked in Load Concepts, refusing anything outside the allowed folders."""
    if choice == NO_FILE:
        return None
    if choice.startswith(INPUT_PREFIX):
        roots, relative = [folder_paths.get_input_directory()], choice[len(INPUT_PREFIX):]
    else:
        roots, relative = concepts_folders(), choice
    path = file_inside(roots, relative)
    if path:
        return path
    raise ConceptError(
        f"file must be a concept file inside models/{CONCEPTS_FOLDER} or the input folder, but got "
        f"'{choice}'. Put the file there and pick it from the list (refresh with R).",
        input_name="file",
    )


def concepts_save_path(filename: str) -> str:
    """Where Save Concepts writes ``filename``: the first concepts folder, no sub-paths."""
    return plain_save_path(concepts_folders()[0], filename, ".json", "my_artists.json", ConceptError)


@functools.lru_cache(maxsize=1)
def clip_token_counter() -> Callable[[str], int]:
    """Counts CLIP BPE tokens (SD1.x, SD2.x and SDXL share the vocabulary) with ComfyUI's merges
    (read once per process; every queued Load Concepts checks its prompts with it)."""
    merges = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer", "merges.txt")
    tokenizer = BPETokenizer(merges)
    return lambda text: len(tokenizer.ids(text))


# -- eraser files (Apply Eraser LoRA, Extract Eraser) ----------------------------------------------

ERASERS_FOLDER = "erasers"
ERASER_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")


def erasers_folders() -> list[str]:
    """The ``models/erasers`` folders."""
    return model_folder(ERASERS_FOLDER, ERASER_EXTENSIONS)


def eraser_choices() -> list[str]:
    """Files in ``models/erasers`` (Receler folders show as ``name/eraser_weights.pt``), then
    ``loras/…`` for ComfyUI's LoRA folder."""
    erasers_folders()
    listed = [f for f in folder_paths.get_filename_list(ERASERS_FOLDER) if f.lower().endswith(ERASER_EXTENSIONS)]
    loras = []
    if "loras" in folder_paths.folder_names_and_paths:
        loras = [LORAS_PREFIX + f for f in folder_paths.get_filename_list("loras")]
    return [NO_FILE, *sorted(listed), *sorted(loras)]


def resolve_eraser(choice: str, input_name: str = "eraser") -> str:
    """The path of a picked eraser file, refusing anything outside the eraser and LoRA folders."""
    if choice.startswith(LORAS_PREFIX) and "loras" in folder_paths.folder_names_and_paths:
        roots, relative = folder_paths.get_folder_paths("loras"), choice[len(LORAS_PREFIX):]
    else:
        roots, relative = erasers_folders(), choice
    path = file_inside(roots, relative) if choice != NO_FILE else None
    if path:
        return path
    raise ErasureError(
        f"{input_name} must be a file inside models/{ERASERS_FOLDER} or models/loras, but got '{choice}'. "
        "Put the file there and pick it from the list (refresh with R).", input_name=input_name)


def eraser_save_path(filename: str) -> str:
    """Where Extract Eraser writes ``filename``: the first erasers folder, no sub-paths."""
    return plain_save_path(erasers_folders()[0], filename, ".safetensors", "esd_vangogh.safetensors", ErasureError)


def model_family_of(model: Any) -> str:
    """``SD1``/``SD2``/``SDXL``/``SD3``/``Flux`` (or ComfyUI's config class name) of a MODEL."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return model_family(type(config).__name__) if config is not None else "unknown"


def _diffusers_unet_map(model: Any) -> dict[str, str]:
    """diffusers UNet key -> ComfyUI key, from ComfyUI's own ``unet_to_diffusers``."""
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not config:
        return {}
    return {k: UNET_PREFIX + v for k, v in comfy.utils.unet_to_diffusers(config).items()}


def unet_key_pairs(model: Any, keys: Sequence[str], naming: Naming) -> list[tuple[str, str]]:
    """``(file_key, model_key)`` for the UNet keys of a weights file; an unknown key raises,
    naming the first one."""
    model_keys = set(model.model_state_dict(filter_prefix=UNET_PREFIX))
    diffusers = _diffusers_unet_map(model) if naming == Naming.DIFFUSERS else {}
    pairs, unknown = [], []
    for key in keys:
        if naming == Naming.DIFFUSERS:
            target = diffusers.get(key.removeprefix("unet."))
        else:
            bare = key.removeprefix("model.").removeprefix(UNET_PREFIX)
            target = UNET_PREFIX + bare
        if target is None or target not in model_keys:
            unknown.append(key)
        else:
            pairs.append((key, target))
    if unknown:
        raise ErasureError(
            f"every UNet weight in the eraser must exist in the connected {model_family_of(model)} model, but "
            f"{len(unknown)} of {len(keys)} do not (first: '{unknown[0]}'). The eraser was made for another "
            "architecture; pick the one for this model.", input_name="eraser")
    return pairs


def _base_loader(model_patcher: Any, prefix: str | None) -> tuple[Callable[[str], torch.Tensor],
                                                                  Callable[[str], torch.dtype]]:
    """Readers of a patcher's weights without its patches (as loaded from the checkpoint)."""
    key_patches = model_patcher.get_key_patches(prefix) if prefix is not None else model_patcher.get_key_patches()

    def read(key: str) -> torch.Tensor:
        base, convert = key_patches[key][0]
        weight = comfy.model_management.cast_to_device(base, torch.device("cpu"), torch.float32, copy=True)
        return convert(weight, inplace=True)

    return read, lambda key: key_patches[key][0][0].dtype


def _arriving_loader(model_patcher: Any, prefix: str | None) -> Callable[[str], torch.Tensor]:
    """Readers of a patcher's weights with the patches already on it (the model as it arrives)."""
    key_patches = model_patcher.get_key_patches(prefix) if prefix is not None else model_patcher.get_key_patches()
    return lambda key: _effective_weight(key_patches[key], key, torch.device("cpu"))()


DIFF_FROM_BASE = "base weights"
DIFF_FROM_ARRIVING = "model as it arrives"


def unet_weight_differences(model: Any, file: EraserFile, pairs: Sequence[tuple[str, str]], reference: str,
                            progress: Progress | None = None, for_patching: bool = True) -> WeightDiff:
    """The UNet weights of ``file`` that differ from the model's; as patch tensors (the model's
    dtype) or, for extraction (``for_patching=False``), in float32."""
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    read_base, dtype_of = _base_loader(model, UNET_PREFIX)
    read = _arriving_loader(model, UNET_PREFIX) if reference == DIFF_FROM_ARRIVING else read_base
    keep = (lambda key: _store_dtype(dtype_of(key))) if for_patching else None
    return weight_differences(pairs, file.__getitem__, read, shapes, model_dtype=dtype_of, delta_dtype=keep,
                              progress=progress)


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def add_diff_patches(patcher_owner: Any, deltas: dict[str, torch.Tensor], strength: float,
                     dtype_of: Callable[[str], torch.dtype]) -> Any:
    """A clone of a MODEL or CLIP with ``("diff", ΔW)`` patches at ``strength``; every key must land."""
    clone = patcher_owner.clone()
    patches = {k: ("diff", (d.to(_store_dtype(dtype_of(k))),)) for k, d in deltas.items()}
    added = set(clone.add_patches(patches, strength))
    missing = sorted(set(patches) - added)
    if missing:
        raise PatchError(f"every eraser weight must land on the model, but {len(missing)} did not (first: "
                         f"'{missing[0]}').", input_name="eraser")
    return clone


def text_encoder_pairs(clip: Any, file: EraserFile) -> list[tuple[str, str]]:
    """``(file_key, clip_key)`` for a CLIPTextModel state dict: ``text_model.*`` under ComfyUI's
    ``clip_l``/``clip_g``/``clip_h`` ``.transformer.``, chosen by shape."""
    clip_shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    by_suffix: dict[str, list[str]] = {}
    for key in clip_shapes:
        at = key.find("transformer.text_model.")
        if at >= 0:
            by_suffix.setdefault(key[at + len("transformer."):], []).append(key)
    pairs = []
    for key in file:
        stripped = strip_text_encoder_prefix(key)
        if stripped is None or stripped.endswith("position_ids"):
            continue
        candidates = [k for k in by_suffix.get(stripped, []) if clip_shapes[k] == file.shapes[key]]
        if not candidates:
            found = by_suffix.get(stripped, [])
            detail = (f"the CLIP's '{found[0]}' is {clip_shapes[found[0]]} but the file's is {file.shapes[key]}"
                      if found else "the connected CLIP has no such weight")
            raise ErasureError(
                f"a text-encoder eraser must fit the connected CLIP, but '{key}' does not: {detail}. Pick the "
                "eraser made for this model's text encoder.", input_name="eraser")
        pairs.append((key, candidates[0]))
    return pairs


def text_encoder_differences(clip: Any, file: EraserFile, pairs: Sequence[tuple[str, str]], reference: str) -> \
        tuple[WeightDiff, Callable[[str], torch.dtype]]:
    shapes = {k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()}
    read_base, dtype_of = _base_loader(clip.patcher, None)
    read = _arriving_loader(clip.patcher, None) if reference == DIFF_FROM_ARRIVING else read_base
    keep = lambda key: _store_dtype(dtype_of(key))  # noqa: E731
    return weight_differences(pairs, file.__getitem__, read, shapes, model_dtype=dtype_of, delta_dtype=keep), dtype_of


def _lora_key_map(model: Any, clip: Any | None) -> dict[str, Any]:
    """ComfyUI's LoRA key map, plus the plain ``unet.<diffusers name>`` aliases that PEFT-style
    SD1/SDXL LoRAs use (built from the same ``unet_to_diffusers`` map)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for diffusers_key, comfy_key in _diffusers_unet_map(model).items():
        if diffusers_key.endswith(".weight"):
            stem = diffusers_key[: -len(".weight")]
            for alias in (stem, "unet." + stem, "base_model.model." + stem, "unet.base_model.model." + stem):
                key_map.setdefault(alias, comfy_key)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


_LORA_MODULE = re.compile(r"(\.lora_(down|up|mid)\.weight|\.lora_[AB](\.default)?\.weight|\.lora\.(down|up)\.weight|"
                          r"_lora\.(down|up)\.weight|\.lora_linear_layer\.(down|up)\.weight|\.lora_[AB]|\.alpha|"
                          r"\.dora_scale)$")


def lora_patches(model: Any, clip: Any | None, file: EraserFile) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(UNet patches, CLIP patches, LoRA modules with no place in this model) via ComfyUI's
    ``load_lora``; each patch is a ComfyUI LoRA adapter."""
    key_map = _lora_key_map(model, clip)
    tensors = file.load_all()
    modules = sorted({_LORA_MODULE.sub("", k) for k in tensors})
    unplaced = [m for m in modules if m not in key_map]
    loaded = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    unet = {k: v for k, v in loaded.items() if _patch_key(k).startswith(UNET_PREFIX)}
    text = {k: v for k, v in loaded.items() if not _patch_key(k).startswith(UNET_PREFIX)}
    return unet, text, unplaced


def _patch_key(key: Any) -> str:
    return key if isinstance(key, str) else key[0]


def add_lora_patches(owner: Any, patches: dict[str, Any], strength: float) -> Any:
    clone = owner.clone()
    added = clone.add_patches(patches, strength)
    if len(added) != len(patches):
        missing = sorted(set(map(_patch_key, patches)) - set(map(_patch_key, added)))
        raise PatchError(f"every LoRA weight must land on the model, but {len(missing)} did not (first: "
                         f"'{missing[0] if missing else '?'}').", input_name="eraser")
    return clone


_LDM_BLOCK = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def receler_blocks(model: Any, adapters: dict[str, Adapter]) -> dict[tuple[str, int], Adapter]:
    """Receler's diffusers block prefixes (``down_blocks.1.attentions.0``) as the ``("input", 4)``
    block ids ComfyUI's UNet passes to attention patches; widths are checked."""
    diffusers = _diffusers_unet_map(model)
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    blocks = {}
    for prefix, adapter in adapters.items():
        target = diffusers.get(f"{prefix}.transformer_blocks.0.attn2.to_out.0.weight")
        match = _LDM_BLOCK.match(target or "")
        if match is None:
            raise ErasureError(
                f"every Receler adapter must sit on a cross-attention block of the connected "
                f"{model_family_of(model)} model, but '{prefix}' has none. Pick the eraser made for this model.",
                input_name="eraser")
        width = shapes[target][0]
        if width != adapter.dim:
            raise ErasureError(
                f"Receler adapter '{prefix}' must match the block's width {width}, but it is {adapter.dim} "
                "wide. Pick the eraser made for this model.", input_name="eraser")
        kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[match.group(1)]
        blocks[(kind, 0 if kind == "middle" else int(match.group(2)))] = adapter
    return blocks


def add_attn2_output_patch(model: Any, patch: Callable[..., Any]) -> Any:
    clone = model.clone()
    clone.set_model_attn2_output_patch(patch)
    return clone


def unet_weight_reader(model: Any) -> tuple[Callable[[str], torch.Tensor], dict[str, tuple[int, ...]],
                                            Callable[[str], torch.dtype]]:
    """(base-weight reader, shapes, dtypes) of a MODEL's UNet (Extract Eraser's original and erased)."""
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}
    read, dtype_of = _base_loader(model, UNET_PREFIX)
    return read, shapes, dtype_of
# -- SPM files (Apply SPM) ------------------------------------------------------------------------

SPM_FOLDER = "spm"
LORAS_FOLDER = "loras"
LORAS_PREFIX = "loras/"
SPM_EXTENSIONS = (".safetensors", ".sft")


def spm_folders() -> list[str]:
    """The ``models/spm`` folders."""
    return model_folder(SPM_FOLDER, SPM_EXTENSIONS)


def _listed(folder: str) -> list[str]:
    if folder not in folder_paths.folder_names_and_paths:
        return []
    return sorted(f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(SPM_EXTENSIONS))


def spm_file_choices() -> list[str]:
    """``none``, the SPM files in ``models/spm``, then the LoRA files (``loras/<name>``)."""
    spm_folders()
    return [NO_FILE, *_listed(SPM_FOLDER), *(LORAS_PREFIX + f for f in _listed(LORAS_FOLDER))]


def resolve_spm_file(choice: str, input_name: str) -> str | None:
    """The path of an SPM picked in Apply SPM, refusing anything outside models/spm and loras."""
    if choice == NO_FILE:
        return None
    spm_folders()
    if choice.startswith(LORAS_PREFIX) and LORAS_FOLDER in folder_paths.folder_names_and_paths:
        folder, relative = LORAS_FOLDER, choice[len(LORAS_PREFIX):]
    else:
        folder, relative = SPM_FOLDER, choice
    path = file_inside(folder_paths.get_folder_paths(folder), relative)
    if path:
        return path
    raise PatchError(
        f"must be an SPM file inside models/{SPM_FOLDER} or models/{LORAS_FOLDER}, but got '{choice}'. Put the "
        "file there and pick it from the list (refresh with R).", input_name=input_name)


def unet_lora_key_map(model: Any) -> dict[str, str]:
    """kohya/diffusers LoRA names -> this model's UNet weight keys (ComfyUI's own LoRA mapping)."""
    return comfy.lora.model_lora_keys_unet(model.model, {})


def unet_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=UNET_PREFIX).items()}


def apply_lora_factors(model: Any, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       strength: float = 1.0) -> Any:
    """A clone of ``model`` with ``up @ down`` added to each key (LoRA adapters; scale folded into
    ``up``). Any key ComfyUI did not accept raises PatchError before the clone is returned."""
    patches = {key: LoRAAdapter(set(), (up, down, None, None, None, None)) for key, (up, down) in factors.items()}
    clone = model.clone()
    added = set(clone.add_patches(patches, strength)) if patches else set()
    missing = sorted(set(patches) - added)
    if missing:
        raise PatchError(
            f"the SPM must fit the connected model, but {len(missing)} of {len(patches)} keys are not in it "
            f"(first: '{missing[0]}'). Connect the model the SPM was made for.", input_name="model")
    return clone


def encode_first_windows(clip: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, set[int], list[bool]]:
    """Per-token hidden states of the first 77-token window of each text, as the user's CLIP
    encodes it (layer choice, weights syntax and CLIP patches included): ``hidden [N, 77, D]``
    float32, ``ids [N, 77]`` (-1 where an embedding vector sits), the special token ids (start,
    end, pad: every id of the empty prompt's window) and, per text, whether it was longer than
    one window (SPM's reference truncates to 77 tokens too)."""
    texts = list(texts)
    empty = clip.tokenize("")
    stream = next(iter(empty))
    special = {int(t[0]) for t in empty[stream][0] if isinstance(t[0], int)}
    firsts, truncated = [], []
    for text in texts:
        tokens = clip.tokenize(text)
        firsts.append({name: windows[0] for name, windows in tokens.items()})
        truncated.append(any(len(windows) > 1 for windows in tokens.values()))
    batch = {name: [w[name] for w in firsts] for name in firsts[0]}
    cond = clip.encode_from_tokens(batch)
    hidden = cond.reshape(len(texts), -1, cond.shape[-1]).float().cpu()
    ids = torch.tensor([[tok[0] if isinstance(tok[0], int) else -1 for tok in w[stream]] for w in firsts],
                       dtype=torch.long)
    return hidden, ids, special, truncated
# -- AttackPrompt (research/attacks_eval.md §A.9, research/comfyui.md §1.9, §3) --------------------

EMBEDDINGS_FOLDER = "embeddings"


def _one_window(clip: Any, text: str, input_name: str) -> dict[str, list[Any]]:
    tokens = clip.tokenize(text)
    for windows in tokens.values():
        if len(windows) != 1:
            raise ConceptError(
                f"the prompt must fit in one 75-token CLIP window, but '{_short(text)}' needs "
                f"{len(windows)}. Shorten it.", input_name=input_name)
    return tokens


def encode_text(clip: Any, text: str, input_name: str = "concept") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cond [T, D] float32, pooled [1, P] or None)`` of one prompt through the user's CLIP (its
    layer choice, weights syntax, embeddings and patches), as CLIPTextEncode would encode it."""
    out = clip.encode_from_tokens(_one_window(clip, text, input_name), return_pooled=True)
    cond, pooled = out if isinstance(out, tuple) else (out, None)
    return cond[0].float(), (pooled.float() if isinstance(pooled, torch.Tensor) else None)


def conditioning(cond: torch.Tensor, pooled: torch.Tensor | None) -> list[list[Any]]:
    """A CONDITIONING (``[[cond [1, T, D], {"pooled_output": ...}]]``) for KSampler."""
    extra = {} if pooled is None else {"pooled_output": pooled.detach().cpu().float()}
    return [[cond.detach().reshape(1, -1, cond.shape[-1]).cpu().float(), extra]]


class ClipTokenSpace:
    """The user's CLIP seen as a map from token ids to encodings, for searches over the vocabulary.

    ``encode_ids(ids [N, K])`` encodes the prompts ``[start, ids..., end, padding]`` (every text
    stream of the CLIP gets the same ids: SD1.x, SD2.x and SDXL share CLIP's vocabulary),
    ``vocabulary`` holds every id except the special tokens, ``decode(ids)`` gives the text.
    """

    def __init__(self, clip: Any, batch_size: int = 32):
        self.clip, self.batch_size = clip, batch_size
        template = clip.tokenize("")
        self.layout = {name: (w[0][0][0], w[0][1][0], w[0][-1][0], len(w[0])) for name, w in template.items()}
        specials = {v for name in self.layout for v in self.layout[name][:3]}
        self.inv_vocab = self._inv_vocab(clip)
        if self.inv_vocab:
            ids = sorted(i for i in self.inv_vocab if i not in specials)
        else:  # a CLIP without a readable vocabulary: ids below the start token
            start = min(v[0] for v in self.layout.values())
            ids = [i for i in range(start) if i not in specials]
        self.vocabulary = torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def _inv_vocab(clip: Any) -> dict[int, str]:
        for value in vars(getattr(clip, "tokenizer", object())).values():
            inv = getattr(value, "inv_vocab", None)
            if isinstance(inv, dict) and inv:
                return inv
        return {}

    @property
    def max_length(self) -> int:
        return min(v[3] for v in self.layout.values()) - 2

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        chunks = []
        for first in range(0, len(ids), self.batch_size):
            batch = ids[first : first + self.batch_size].tolist()
            tokens = {}
            for name, (start, end, pad, length) in self.layout.items():
                tokens[name] = [[(t, 1.0) for t in [start, *row, end] + [pad] * (length - len(row) - 2)]
                                for row in batch]
            cond = self.clip.encode_from_tokens(tokens)
            chunks.append(cond.reshape(len(batch), -1, cond.shape[-1]).float())
        return torch.cat(chunks)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, with ``(`` and ``)`` escaped so that typing it does not weight tokens."""

        if not self.inv_vocab:
            return ""
        text = decode_bpe_tokens([self.inv_vocab.get(int(i), "") for i in ids])
        return text.replace("\\", " ").replace("(", "\\(").replace(")", "\\)")


def kv_sites_pair(erased: Any, original: Any) -> tuple[ArchSpec, list[AttentionSite], list[AttentionSite]]:
    """The K/V sites of the erased and of the original MODEL (each as it arrives), checked to be
    one architecture."""
    spec_e, sites_e = attention_sites(erased)
    spec_o, sites_o = attention_sites(original)
    if spec_e.name != spec_o.name:

        raise ArchitectureError(
            f"the original model must be the same architecture as the erased one, but got "
            f"{spec_o.display_name} and {spec_e.display_name}. Connect the model the erasure was made from.",
            input_name="original_model")
    return spec_e, sites_e, sites_o


def embedding_path(name: str, overwrite: bool) -> str:
    """Where an attack embedding called ``name`` goes (``models/embeddings``), checked before any
    work: a plain file name, and new unless ``overwrite``."""

    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or os.path.basename(stem) != stem or stem.startswith(".") or " " in stem:
        raise ConfigError(f"save_embedding must be a plain file name without spaces or folders, but got "
                          f"'{name}'. Type a name such as 'vangogh_attack'.", input_name="save_embedding")
    folder = model_folder(EMBEDDINGS_FOLDER, (".safetensors", ".pt", ".bin"))[0]  # ComfyUI registers it
    path = os.path.join(folder, stem + ".safetensors")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"save_embedding must name a new file unless overwrite is on, but '{stem}.safetensors' "
                          "exists. Pick another name or turn overwrite on.", input_name="save_embedding")
    return path


def save_embedding(path: str, key: str, rows: torch.Tensor, meta: dict[str, str]) -> None:
    """Write ``{key: rows [k, D]}`` as a safetensors embedding that ``embedding:name`` loads."""
    import safetensors.torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file({key: rows.detach().cpu().float().contiguous()}, path, metadata=meta)


class DifferentiableClip:
    """An out-of-place forward of a one-tower CLIP (SD1.x, SD2.x) from input word embeddings, with
    the CLIP's layer choice and its (patched) weights cloned as float32 outside inference mode.

    ComfyUI's own forward adds residuals in place (``x += ...``), which breaks backpropagation to
    the inputs, and its weights are inference tensors (research/comfyui.md §1.9, §3.6).
    """

    def __init__(self, clip: Any, device: torch.device):

        model = clip.cond_stage_model
        name = getattr(model, "clip", None)
        tower = getattr(model, name, None) if isinstance(name, str) else None
        text_model = getattr(getattr(tower, "transformer", None), "text_model", None)
        if text_model is None:
            raise ArchitectureError(
                "soft_prompt needs a model with one CLIP text encoder (SD1.x or SD2.x), but this CLIP has "
                "several (SDXL) or an unknown layout. Use closed_form or concept_vector for it.", input_name="clip")
        clip.load_model()  # CLIP LoRAs are applied to the loaded weights
        model.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            model.set_clip_options({"layer": clip.layer_idx})
        self.layer, self.layer_idx = tower.layer, tower.layer_idx
        model.reset_clip_options()
        if self.layer == "all":
            raise ArchitectureError("soft_prompt needs one CLIP output layer, but this CLIP returns all.",
                                    input_name="clip")
        self.key, self.special = name, dict(tower.special_tokens)
        self.norm_hidden, self.masks = tower.layer_norm_hidden_state, tower.enable_attention_masks
        self.layers = list(text_model.encoder.layers)
        self.final_eps = text_model.final_layer_norm.eps
        with torch.inference_mode(False):
            self.p = {n: v.detach().to(device=device, dtype=torch.float32, copy=True)
                      for n, v in text_model.named_parameters()}
        self.table = self.p["embeddings.token_embedding.weight"]
        self.device = device

    def forward(self, embeds: torch.Tensor, eot: int) -> torch.Tensor:
        """``[B, T, D]`` input embeddings (position embeddings not yet added) -> encoder output."""
        p, (b, t, d) = self.p, embeds.shape
        x = embeds + p["embeddings.position_embedding.weight"][:t]
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        if self.masks:
            mask = mask.masked_fill(torch.arange(t, device=x.device)[None, :] > eot, float("-inf"))
        hidden_at = None
        if self.layer == "hidden":
            hidden_at = self.layer_idx if self.layer_idx >= 0 else len(self.layers) + self.layer_idx
        inter = None
        for i, layer in enumerate(self.layers):
            pre = f"encoder.layers.{i}."

            def lin(x: torch.Tensor, name: str, pre: str = pre) -> torch.Tensor:
                return torch.nn.functional.linear(x, p[pre + name + ".weight"], p[pre + name + ".bias"])

            h = torch.nn.functional.layer_norm(x, (d,), p[pre + "layer_norm1.weight"], p[pre + "layer_norm1.bias"],
                                               layer.layer_norm1.eps)
            heads = layer.self_attn.heads
            q, k, v = (lin(h, f"self_attn.{n}_proj").view(b, t, heads, d // heads).transpose(1, 2) for n in "qkv")
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + lin(o.transpose(1, 2).reshape(b, t, d), "self_attn.out_proj")
            h = torch.nn.functional.layer_norm(x, (d,), p[pre + "layer_norm2.weight"], p[pre + "layer_norm2.bias"],
                                               layer.layer_norm2.eps)
            x = x + lin(layer.mlp.activation(lin(h, "mlp.fc1")), "mlp.fc2")
            if i == hidden_at:
                inter = x
        out = x if inter is None else inter
        if inter is None or self.norm_hidden:
            out = torch.nn.functional.layer_norm(out, (d,), p["final_layer_norm.weight"], p["final_layer_norm.bias"],
                                                 self.final_eps)
        return out


def _unet_prefix_keys(model: Any) -> list[str]:
    return [k for k in model.model_state_dict() if k.startswith(UNET_PREFIX)]


def _predict_eps(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:

    context = cond.reshape(1, -1, cond.shape[-1]).expand(x.shape[0], -1, -1)
    denoised = model.model.apply_model(x, sigma, c_crossattn=context)
    return eps_from_denoised(x, denoised.float(), sigma)


def soft_prompt_attack(erased: Any, original: Any, clip: Any, concept: str, *, prefix_tokens: int, steps: int,
                       lr: float, seed: int, noise_samples: int, latent: dict | None,
                       progress: Progress | None) -> dict[str, Any]:
    """The soft-prompt attack on ComfyUI models (research/attacks_eval.md §A.7, comfyui.md §1.9).

    Noise targets come from the original model (no gradients); the erased model is then re-loaded
    outside inference mode on a clone whose every UNet weight carries a zero-strength patch, so
    its weights are rebuilt as ordinary tensors and gradients reach the prefix embeddings.
    """

    device = compute_device()
    text = DifferentiableClip(clip, device)
    tokens = _one_window(clip, concept, "concept")
    if len(tokens) != 1:
        raise ConceptError("soft_prompt needs a one-stream CLIP.", input_name="clip")
    stream, windows = next(iter(tokens.items()))
    ids = [tok[0] for tok in windows[0]]
    if not all(isinstance(i, int) for i in ids):
        raise ConceptError("concept must be plain text for soft_prompt (no embedding: references).",
                           input_name="concept")
    end = text.special.get("end", ids[-1])
    eot = next(j for j in range(1, len(ids)) if ids[j] == end)
    if eot + prefix_tokens >= len(ids):
        raise ConceptError(f"concept plus {prefix_tokens} prefix tokens must fit one 75-token window; shorten "
                           "the concept or lower prefix_tokens.", input_name="concept")
    body = ids[1 : len(ids) - prefix_tokens]
    concept_cond, _ = encode_text(clip, concept)

    space = ClipTokenSpace(clip)
    gen = torch.Generator().manual_seed(int(seed))
    start_ids = space.vocabulary[torch.randint(len(space.vocabulary), (prefix_tokens,), generator=gen)]
    inner = erased.model
    channels = inner.latent_format.latent_channels
    x0 = (inner.process_latent_in(latent["samples"][:1].float()) if latent is not None
          else torch.zeros(1, channels, 64, 64))
    percents, noise = draw_noise_samples(noise_samples, tuple(x0.shape[1:]), seed)
    sampling = erased.get_model_object("model_sampling")
    sigma = torch.tensor([float(sampling.percent_to_sigma(float(pc))) for pc in percents])
    x = (x0 + noise * sigma.view(-1, 1, 1, 1)).to(device)
    sigma, cond_c = sigma.to(device), concept_cond.to(device)

    with torch.no_grad():
        comfy.model_management.load_models_gpu([original])
        eps_orig = _predict_eps(original, x, sigma, cond_c).float()
        comfy.model_management.load_models_gpu([erased])
        eps_erased = _predict_eps(erased, x, sigma, cond_c).float()

    with torch.inference_mode(False), torch.enable_grad():
        trainable = erased.clone()
        trainable.add_patches(dict.fromkeys(_unet_prefix_keys(trainable), (None,)), 0.0, 1.0)
        comfy.model_management.load_models_gpu([trainable], force_full_load=True)
        xg, sg, target = x.clone(), sigma.clone(), eps_orig.clone()
        table = text.table
        head = table[ids[:1]].clone()
        tail = table[torch.tensor(body, device=table.device)].clone()

        def embed(prefix: torch.Tensor) -> torch.Tensor:
            return torch.cat([head, prefix, tail])[None]

        def loss(prefix: torch.Tensor) -> torch.Tensor:
            cond = text.forward(embed(prefix), eot + prefix_tokens)
            return ((_predict_eps(trainable, xg, sg, cond) - target) ** 2).mean()

        result = optimise_prefix(table[start_ids.to(table.device)], loss, steps=steps, lr=lr, progress=progress)
        prefix = result.prefix
        window = [windows[0][0], *[(row.clone(), 1.0) for row in prefix.cpu()], *[(i, 1.0) for i in body]]
        cond, pooled = clip.encode_from_tokens({stream: [window]}, return_pooled=True)
        with torch.no_grad():
            eps_attack = _predict_eps(trainable, xg, sg, cond.to(device).float()).float()
    nearest = nearest_tokens(prefix, table, space.vocabulary.to(table.device))
    return {
        "cond": cond[0].detach().float().cpu(), "pooled": pooled, "prefix": prefix.cpu(),
        "losses": result.losses, "best_step": result.best_step, "embedding_key": text.key,
        "nearest": nearest.tolist(), "text": (space.decode(nearest.tolist()) + " " + concept).strip(),
        "eps": (float(((eps_attack - eps_orig) ** 2).sum()), float(((eps_erased - eps_orig) ** 2).sum()),
                float((eps_orig ** 2).sum())),
    }
