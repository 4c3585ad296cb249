"""Model folders and files: concept files, eraser files, SPM files and attack embeddings; choices for
combos, safe resolution inside the allowed folders, and save paths."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence

import folder_paths
import torch

from ...erasure_core import (
    ConceptError,
    ConfigError,
    PatchError,
)
from ...erasure_core.errors import ErasureError
from ...erasure_core.formats.concept_files import FILE_EXTENSIONS

logger = logging.getLogger(__name__)


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



MAX_NAME_BYTES = 200
"""Longest file name a saving node writes (UTF-8 bytes, suffix included): most file systems stop
at 255, and ComfyUI's temporary files add to it."""

# Names Windows refuses whatever the extension (a workflow shared across systems must save on both).
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')  # control characters and what Windows refuses


def check_file_name(filename: str, suffix: str, example: str, error: type[ErasureError],
                    input_name: str = "filename") -> str:
    """The plain file name ``filename`` (``suffix`` added when missing) or ``error`` naming
    ``input_name``: no folders, hidden files, control characters (NUL, newline), characters
    Windows refuses, reserved device names or names over :data:`MAX_NAME_BYTES`. Cheap and
    touches no file: every saving node calls it before any work."""
    if not isinstance(filename, str):
        raise error(f"{input_name} must be text, but got {type(filename).__name__}.", input_name=input_name)
    name = filename.strip()
    shown = repr(filename[:60])
    fix = f"Type a name such as '{example}'."
    if not name or os.path.basename(name) != name or "/" in name or "\\" in name or name.startswith("."):
        raise error(f"{input_name} must be a plain file name (no folders), but got {shown}. {fix}",
                    input_name=input_name)
    if _FORBIDDEN.search(name):  # one C-speed scan: a 20 MB name through the HTTP API costs ~0.1 s, not 2 s
        raise error(f"{input_name} must not contain control characters (NUL, newline, tab) or any of <>:\"|?*, "
                    f"but got {shown}. {fix}", input_name=input_name)
    if not name.lower().endswith(suffix):
        name += suffix
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise error(f"{input_name} must be at most {MAX_NAME_BYTES} bytes long, but got {len(name.encode())}. "
                    f"{fix}", input_name=input_name)
    if name.split(".")[0].strip().lower() in _RESERVED or name.endswith((" ", ".")):
        raise error(f"{input_name} must not be a reserved device name (CON, NUL, COM1...) or end in a dot or "
                    f"space, but got {shown}. {fix}", input_name=input_name)
    return name


def refuse_existing(path: str, overwrite: bool, error: type[ErasureError], input_name: str = "filename") -> None:
    """Every saving node's overwrite rule: an existing ``path`` is refused unless ``overwrite``,
    naming ``input_name`` (checked before any work, so nothing is written on the way to the error)."""
    if os.path.exists(path) and not overwrite:
        raise error(f"{input_name} must name a new file unless overwrite is on, but '{os.path.basename(path)}' "
                    f"exists in {os.path.basename(os.path.dirname(path)) or 'its folder'}. Pick another name or "
                    "turn overwrite on.", input_name=input_name)


def plain_save_path(folder: str, filename: str, suffix: str, example: str, error: type[ErasureError],
                    input_name: str = "filename") -> str:
    """``folder/filename`` (``suffix`` added when missing) for a node that writes a file, the name
    checked by :func:`check_file_name` before any folder is made."""
    name = check_file_name(filename, suffix, example, error, input_name)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


EMBEDDING_PREFIX = "embedding:"


def missing_embeddings(text: str) -> list[str]:
    """The ``embedding:name`` references in ``text`` that ComfyUI's CLIP would not find (it drops
    them with only a log line, so the concept would silently lose words)."""
    if EMBEDDING_PREFIX not in text:
        return []
    roots = folder_paths.get_folder_paths("embeddings") if "embeddings" in folder_paths.folder_names_and_paths else []
    missing = []
    for word in dict.fromkeys(text.replace("\n", " ").split(" ")):  # each distinct word looked up once
        if not word.startswith(EMBEDDING_PREFIX):
            continue
        name = word[len(EMBEDDING_PREFIX):].rstrip(",.;:!?)")
        found = name and any(file_inside([root], name + ext) for root in roots
                             for ext in ("", ".safetensors", ".pt", ".bin"))
        if not found:
            missing.append(name)
    return missing



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

SPM_FOLDER = "spm"

LORAS_FOLDER = "loras"

LORAS_PREFIX = "loras/"

SPM_EXTENSIONS = (".safetensors", ".sft")


def loras_save_path(filename: str) -> str:
    """Where Save Erasure writes ``filename``: the first ``models/loras`` folder, no sub-paths."""
    roots = folder_paths.get_folder_paths(LORAS_FOLDER)
    return plain_save_path(roots[0], filename, ".safetensors", "no_van_gogh.safetensors", PatchError)




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

EMBEDDINGS_FOLDER = "embeddings"



def embedding_path(name: str, overwrite: bool) -> str:
    """Where an attack embedding called ``name`` goes (``models/embeddings``), checked before any
    work: a plain file name, and new unless ``overwrite``."""

    stem = check_file_name(name, ".safetensors", "vangogh_attack", ConfigError, "save_embedding")
    stem = stem[: -len(".safetensors")]
    if " " in stem:
        raise ConfigError(f"save_embedding must be a plain file name without spaces or folders, but got "
                          f"'{name}'. Type a name such as 'vangogh_attack'.", input_name="save_embedding")
    folder = model_folder(EMBEDDINGS_FOLDER, (".safetensors", ".pt", ".bin"))[0]  # ComfyUI registers it
    path = os.path.join(folder, stem + ".safetensors")
    refuse_existing(path, overwrite, ConfigError, "save_embedding")
    return path



def save_embedding(path: str, key: str, rows: torch.Tensor, meta: dict[str, str]) -> None:
    """Write ``{key: rows [k, D]}`` as a safetensors embedding that ``embedding:name`` loads."""
    import safetensors.torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file({key: rows.detach().cpu().float().contiguous()}, path, metadata=meta)
