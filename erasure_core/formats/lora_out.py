"""A PatchSet written as a standard LoRA file (Save Erasure, and the CLI's ``erase``).

Module names are the ones ComfyUI's ``comfy.lora.model_lora_keys_unet`` maps and kohya-style
tools (sd-scripts, A1111/Forge) write for that architecture, chosen per architecture from the
table ``LORA_TARGETS`` (a new family is a new row):

- SD1.x / SD2.x: ``lora_unet_<diffusers path>`` (``lora_unet_down_blocks_0_attentions_0_…``), as
  sd-scripts names SD1/SD2 LoRAs. The diffusers path of an LDM block exists only for the standard
  UNet layout (two res blocks per level); a patch for any other layout is written with the LDM
  names below, which ComfyUI maps for every layout (the report says so).
- SDXL: ``lora_unet_<LDM path>`` (``lora_unet_input_blocks_4_1_…``), as sd-scripts names SDXL
  LoRAs; A1111 maps these by replacing ``lora_unet`` with ``diffusion_model``.

Tensors per module: low-rank entries as ``.lora_up.weight [d_out, r]``, ``.lora_down.weight
[r, d_in]`` and ``.alpha = r`` (scale 1); dense entries either as ComfyUI's ``.diff`` (the weight
difference itself, also read by A1111's "full" networks) or factored to the rank/error asked for
(``edit.extract.extract_low_rank``). Every stored module's relative error
``‖ΔW − ΔW_stored‖_F / ‖ΔW‖_F`` (truncation and rounding to the file's precision) is measured and
reported. Metadata: method, concepts, config, pack version, model family (plus kohya's
``ss_*`` and ModelSpec keys readers look for, and ``concept_text`` for gating). The bytes are the
same for the same patch and options (``formats.safetensors_out``): the PatchSet's timing is left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ..architectures import ARCHITECTURES, ArchSpec, reference_site_shapes
from ..edit.extract import extract_low_rank
from ..edit.patch import PatchEntry, PatchSet
from ..errors import ArchitectureError, ConfigError, PatchError
from ..version import __version__
from .safetensors_out import safetensors_bytes, write_atomic

__all__ = ["LORA_FORMAT_NAME", "LORA_TARGETS", "DenseAs", "LoraReport", "LoraTarget", "Precision",
           "lora_bytes", "lora_metadata", "module_names", "patch_architecture", "save_lora"]

LORA_FORMAT_NAME = "concept_erasure.lora"
UNET_PREFIX = "diffusion_model."
VOLATILE_META = ("seconds",)  # differs run to run; left out so equal inputs give equal bytes


class DenseAs(str, Enum):
    """How a full-rank (dense) entry is stored."""

    DIFFERENCE = "weight difference"
    LOW_RANK = "low rank"


class Precision(str, Enum):
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


# -- module names per architecture ---------------------------------------------------------------
_LDM_ATTENTION = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$|^middle_block\.1\.(.+)$")


def _diffusers_path(ldm: str) -> str | None:
    """``down_blocks.0.attentions.0.<rest>`` for an attention block of the standard SD UNet (two res
    blocks per level: three LDM blocks per level on the way down, three up), else None."""
    m = _LDM_ATTENTION.match(ldm)
    if m is None:
        return None
    if m.group(4) is not None:
        return f"mid_block.attentions.0.{m.group(4)}"
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "input_blocks":
        level, slot = divmod(i - 1, 3)
        return f"down_blocks.{level}.attentions.{slot}.{rest}" if i >= 1 and slot < 2 else None
    level, slot = divmod(i, 3)
    return f"up_blocks.{level}.attentions.{slot}.{rest}"


def _ldm_path(key: str) -> str:
    if not key.startswith(UNET_PREFIX) or not key.endswith(".weight"):
        raise PatchError(f"a LoRA module needs a UNet weight key ('{UNET_PREFIX}….weight'), but the patch has "
                         f"'{key}'. Save a patch made by this pack for a UNet model.", input_name="patch")
    return key[len(UNET_PREFIX):-len(".weight")]


def _ldm_names(keys: Sequence[str]) -> tuple[dict[str, str], str]:
    return {k: "lora_unet_" + _ldm_path(k).replace(".", "_") for k in keys}, "kohya names, LDM paths"


def _standard_layout(arch: str, keys: Sequence[str]) -> bool:
    """Every key's attention block is one of the full-size model's (not a pruned or tiny UNet)."""
    blocks = {k.split(".transformer_blocks.")[0] for k in reference_site_shapes(arch, UNET_PREFIX)
              if ".transformer_blocks." in k}
    return all(any(k.startswith(b + ".") for b in blocks) for k in keys)


def _sd_diffusers_names(arch: str) -> Callable[[Sequence[str]], tuple[dict[str, str], str]]:
    def names(keys: Sequence[str]) -> tuple[dict[str, str], str]:
        paths = {k: _diffusers_path(_ldm_path(k)) for k in keys}
        if not _standard_layout(arch, keys) or any(p is None for p in paths.values()):
            out, _ = _ldm_names(keys)
            return out, "kohya names, LDM paths (not the standard UNet layout, so no diffusers names)"
        return {k: "lora_unet_" + p.replace(".", "_") for k, p in paths.items()}, "kohya names, diffusers paths"

    return names


@dataclass(frozen=True)
class LoraTarget:
    """How one architecture's LoRAs are written: the module namer (patch keys -> module names and a
    line saying which naming), our family name, and the base-model ids kohya/ModelSpec readers use."""

    names: Callable[[Sequence[str]], tuple[dict[str, str], str]]
    family: str
    ss_base_model_version: str
    modelspec_architecture: str | None = None


LORA_TARGETS: dict[str, LoraTarget] = {
    "sd1": LoraTarget(_sd_diffusers_names("sd1"), "SD1", "sd_v1", "stable-diffusion-v1/lora"),
    "sd2": LoraTarget(_sd_diffusers_names("sd2"), "SD2", "sd_v2"),
    "sdxl": LoraTarget(_ldm_names, "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
}


def patch_architecture(patch: PatchSet) -> ArchSpec:
    """The architecture a patch was made for: ``meta['architecture']`` when recorded, else the
    spec whose edit sites and text width fit every key."""
    named = patch.meta.get("architecture")
    by_name = {s.name: s for s in ARCHITECTURES}
    if isinstance(named, str) and named in by_name:
        return by_name[named]
    if not len(patch):
        raise PatchError("the patch must hold at least one weight edit, but it is empty.", input_name="patch")
    for spec in ARCHITECTURES:
        if spec.context_dim is None or spec.name not in LORA_TARGETS:
            continue
        pattern = re.compile(spec.site_pattern)
        if all(pattern.search(k) and patch[k].shape[1] == spec.context_dim for k in patch.keys()):
            return spec
    widths = sorted({patch[k].shape[1] for k in patch.keys()})
    raise ArchitectureError(
        f"the patch must be a K/V edit of a supported architecture ({', '.join(LORA_TARGETS)}), but its "
        f"{len(patch)} keys (first '{patch.keys()[0]}', input widths {widths}) match none. Save patches from "
        "Closed-Form Erase.", input_name="patch")


def module_names(patch: PatchSet, spec: ArchSpec | None = None) -> tuple[dict[str, str], str]:
    """``{patch key: LoRA module name}`` and a line naming the convention used."""
    spec = spec or patch_architecture(patch)
    if spec.name not in LORA_TARGETS:
        raise ArchitectureError(f"LoRA files for {spec.display_name} cannot be written yet; supported: "
                                f"{', '.join(LORA_TARGETS)}.", input_name="patch")
    return LORA_TARGETS[spec.name].names(patch.keys())


# -- metadata ------------------------------------------------------------------------------------
def _stable(meta: Any) -> Any:
    if isinstance(meta, Mapping):
        return {k: _stable(v) for k, v in meta.items() if k not in VOLATILE_META}
    if isinstance(meta, (list, tuple)):
        return [_stable(v) for v in meta]
    return meta


def _runs(meta: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The single-method metas inside a (possibly merged) patch's meta."""
    if "merged" in meta and isinstance(meta["merged"], list):
        return [r for m in meta["merged"] if isinstance(m, Mapping) for r in _runs(m)]
    return [meta]


def _target_names(runs: list[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for run in runs:
        concepts = run.get("concepts")
        for t in concepts.get("targets", []) if isinstance(concepts, Mapping) else []:
            name = t.get("name") if isinstance(t, Mapping) else None
            if name and name not in names:
                names.append(str(name))
    return names


def lora_metadata(patch: PatchSet, spec: ArchSpec, storage: Mapping[str, Any]) -> dict[str, str]:
    """String metadata of the file (every value a string, as safetensors requires)."""
    meta = _stable(dict(patch.meta))
    runs = _runs(meta)
    methods = [str(r.get("method", "unknown")) for r in runs]
    target = LORA_TARGETS[spec.name]
    concepts = [r.get("concepts") for r in runs]
    configs = [r.get("config") for r in runs]
    out = {
        "format": LORA_FORMAT_NAME,
        "format_version": "1",
        "concept_text": ", ".join(_target_names(runs)),
        "concept_erasure.method": "+".join(methods),
        "concept_erasure.concepts": json.dumps(concepts[0] if len(concepts) == 1 else concepts, sort_keys=True),
        "concept_erasure.config": json.dumps(configs[0] if len(configs) == 1 else configs, sort_keys=True),
        "concept_erasure.version": __version__,
        "concept_erasure.family": target.family,
        "concept_erasure.architecture": spec.name,
        "concept_erasure.storage": json.dumps(dict(storage), sort_keys=True),
        "concept_erasure.meta": json.dumps(meta, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_base_model_version": target.ss_base_model_version,
    }
    if target.modelspec_architecture:
        out["modelspec.sai_model_spec"] = "1.0.0"
        out["modelspec.architecture"] = target.modelspec_architecture
        out["modelspec.implementation"] = "https://github.com/Stability-AI/generative-models"
    return out


# -- the file ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraReport:
    """What was written: module counts by storage, ranks, the measured error, size, naming."""

    family: str
    naming: str
    modules: int
    low_rank: int
    differences: int
    compressed: int
    max_rank: int
    max_error: float
    worst_key: str
    nbytes: int
    precision: str
    compressed_ranks: tuple[int, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        stored = [f"{self.low_rank} low-rank (exact factors)"] if self.low_rank else []
        if self.differences:
            stored.append(f"{self.differences} as weight differences")
        if self.compressed:
            r = sorted(self.compressed_ranks)
            stored.append(f"{self.compressed} dense compressed to rank {r[0]}-{r[-1]}")
        return [f"{self.family} LoRA, {self.modules} modules ({self.naming}), {self.precision}",
                "stored: " + ", ".join(stored),
                f"max rank {self.max_rank}; relative error max {self.max_error:.2e} ('{self.worst_key}')",
                f"{self.nbytes / 2**20:.2f} MiB"]

    def summary(self) -> str:
        return "; ".join(self.lines())


def _balanced(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank component's up column and down row of equal norm, so that
    neither factor leaves the range of a 16-bit file while the other underflows."""
    nu, nd = up.norm(dim=0), down.norm(dim=1)
    scale = torch.where((nu > 0) & (nd > 0), (nd / nu.clamp_min(1e-30)).sqrt(), torch.ones_like(nu))
    return up * scale, down / scale[:, None]


def _rel_error(delta: torch.Tensor, stored: torch.Tensor) -> float:
    total = float(torch.linalg.matrix_norm(delta.double()))
    return float(torch.linalg.matrix_norm((delta - stored).double())) / total if total > 0 else 0.0


def lora_bytes(
    patch: PatchSet,
    *,
    dense_as: DenseAs | str = DenseAs.DIFFERENCE,
    max_rank: int = 64,
    max_error: float = 0.01,
    precision: Precision | str = Precision.FLOAT16,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[bytes, LoraReport]:
    """The LoRA file's bytes for ``patch`` and what they hold (see the module docstring)."""
    try:
        dense_as, precision = DenseAs(dense_as), Precision(precision)
    except ValueError as exc:
        raise ConfigError(f"{exc}; expected dense_as in {[d.value for d in DenseAs]} and precision in "
                          f"{[p.value for p in Precision]}.", input_name="dense_as") from None
    spec = patch_architecture(patch)
    names, naming = module_names(patch, spec)
    dtype = precision.torch
    dense = {k: e.diff for k, e in patch.entries.items() if not e.is_low_rank}
    compressed: dict[str, PatchEntry] = {}
    if dense and dense_as == DenseAs.LOW_RANK:
        compressed = dict(extract_low_rank(dense, max_rank=max_rank, max_error=max_error, device=device,
                                                input_name="patch")[0].entries)
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: list[int] = []
    counts = {"low_rank": 0, "differences": 0, "compressed": 0}
    for done, (key, entry) in enumerate(patch.entries.items(), 1):
        name = names[key]
        source = compressed.get(key, entry)
        if source.is_low_rank:
            up, down = _balanced(source.up.float(), source.down.float())  # type: ignore[union-attr]
            up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
            tensors[f"{name}.alpha"] = torch.tensor(float(up.shape[1]), dtype=torch.float32)
            stored = up.float() @ down.float()
            ranks.append(int(up.shape[1]))
            counts["compressed" if key in compressed else "low_rank"] += 1
        else:
            tensors[f"{name}.diff"] = entry.diff.to(dtype).contiguous()  # type: ignore[union-attr]
            stored = tensors[f"{name}.diff"].float()
            counts["differences"] += 1
        errors[key] = _rel_error(entry.dense(), stored)
        if progress is not None:
            progress(done, len(patch))
    storage = {"dense_as": dense_as.value, "precision": precision.value, "naming": naming}
    if compressed:
        storage |= {"max_rank": max_rank, "max_error": max_error}
    data = safetensors_bytes(tensors, lora_metadata(patch, spec, storage))
    worst = max(errors, key=errors.__getitem__)
    report = LoraReport(LORA_TARGETS[spec.name].family, naming, len(patch), counts["low_rank"],
                        counts["differences"], counts["compressed"], max(ranks, default=0), errors[worst],
                        names[worst], len(data), precision.value,
                        tuple(int(compressed[k].rank) for k in compressed))
    return data, report


def save_lora(path: str, patch: PatchSet, **options: Any) -> LoraReport:
    """Write ``patch`` to ``path`` as a LoRA (atomically; options as :func:`lora_bytes`)."""
    data, report = lora_bytes(patch, **options)
    write_atomic(path, data)
    return report
