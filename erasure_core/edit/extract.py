"""Weight differences of an erased model, and their low-rank extraction into a small eraser.

``weight_differences`` compares an eraser's weights with the model's (key by key, one tensor
in memory at a time) and keeps only the weights that changed: ``ΔW = W_file − W_model``.
Unchanged weights of a full checkpoint differ from the model's by at most the rounding of the
two dtypes, so a per-key tolerance of a few units in the last place of the coarser dtype
separates "unchanged" from "erased".

``extract_low_rank`` turns each ``ΔW`` into rank-r factors ``up [d_out, r] @ down [r, d_in]`` by a
truncated SVD (Eckart–Young: the best rank-r approximation in Frobenius norm; a seeded
randomized SVD for the leading values of wide weights), choosing per key the smallest r whose
relative error ``‖ΔW − up·down‖_F / ‖ΔW‖_F`` is at most ``max_error``, capped at ``max_rank``;
the error reported is measured on the stored factors. Convolution kernels are flattened to ``[d_out, d_in·kh·kw]`` and biases
to ``[d, 1]``; ComfyUI's LoRA patch reshapes the product back to the weight's shape. The result
is a PatchSet, saved in our safetensors patch format.

A file in another naming may split what the model fuses (diffusers' Flux ``attn.to_q``/``to_k``/``to_v``
are row blocks of ComfyUI's ``img_attn.qkv``): :class:`KeyPart` says where each file tensor lands,
and :func:`fused_pairs` gives pairs and a file reader that assemble each model weight from its parts
(rows the file lacks keep the model's own values, so they do not differ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ErasureError, NumericalError
from .patch import PatchEntry, PatchSet

__all__ = ["ExtractionReport", "KeyFit", "KeyPart", "WeightDiff", "extract_low_rank", "fused_pairs",
           "rounding_tolerance", "weight_differences"]


@dataclass(frozen=True)
class WeightDiff:
    """The changed weights: ``deltas[model_key] = ΔW`` (float32, the weight's shape)."""

    deltas: dict[str, torch.Tensor]
    unchanged: int
    compared: int
    skipped: tuple[str, ...]  # file keys that are not floating-point weights (ids, counters)

    @property
    def changed(self) -> int:
        return len(self.deltas)


@dataclass(frozen=True)
class KeyPart:
    """Where one file tensor lands in a model weight ``target``: the whole weight (``dim`` None) or the
    slice ``[offset, offset + size)`` along ``dim``, after ``transform`` (a reordering such as Flux's
    final-layer scale/shift swap)."""

    target: str
    dim: int | None = None
    offset: int = 0
    size: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def fused_pairs(parts: Mapping[str, KeyPart], read_file: Callable[[str], torch.Tensor],
                read_model: Callable[[str], torch.Tensor], model_shapes: Mapping[str, tuple[int, ...]], *,
                input_name: str = "eraser") -> tuple[list[tuple[str, str]], Callable[[str], torch.Tensor]]:
    """``(pairs, reader)`` for :func:`weight_differences` over a file whose tensors are ``parts`` of
    the model's weights: one pair per model weight (its own key on both sides) and a reader that
    assembles it in float32 from the model's weight with the file's parts written in. A part whose
    slice does not fit the weight raises ErasureError naming it and the node input ``input_name``."""
    by_target: dict[str, list[tuple[str, KeyPart]]] = {}
    for file_key, part in parts.items():
        by_target.setdefault(part.target, []).append((file_key, part))
    for target, group in by_target.items():
        shape = tuple(model_shapes[target])
        for file_key, part in group:
            if part.dim is not None and (part.dim >= len(shape) or part.offset + part.size > shape[part.dim]):
                raise ErasureError(
                    f"{input_name} weights must fit the connected model, but '{file_key}' goes to rows "
                    f"{part.offset}-{part.offset + part.size} of '{target}', which is {shape}. The {input_name} was "
                    "made for another model size; pick the one for this model.", input_name=input_name)

    def read(target: str) -> torch.Tensor:
        group = by_target[target]
        whole = [fk for fk, part in group if part.dim is None]
        out = None if whole and len(group) == 1 else read_model(target).float().clone()
        for file_key, part in group:
            tensor = read_file(file_key)
            if not tensor.is_floating_point():
                return tensor  # skipped by weight_differences
            tensor = part.transform(tensor) if part.transform is not None else tensor
            if part.dim is None and out is None:
                return tensor  # its shape is checked by weight_differences
            place = out if part.dim is None else out.narrow(part.dim, part.offset, part.size)
            if tuple(tensor.shape) != tuple(place.shape):
                raise ErasureError(
                    f"{input_name} weights must have the connected model's shapes, but '{file_key}' is "
                    f"{tuple(tensor.shape)} where '{target}' holds {tuple(place.shape)}. The {input_name} was made "
                    "for another model size; pick the one for this model.", input_name=input_name)
            place.copy_(tensor.float())
        return out  # type: ignore[return-value]

    return [(target, target) for target in by_target], read


def rounding_tolerance(*dtypes: torch.dtype) -> float:
    """Relative size of a difference that is only rounding between these dtypes (4 ulps)."""
    eps = max(torch.finfo(d).eps if d.is_floating_point else 0.0 for d in dtypes)
    return 4.0 * eps


def weight_differences(
    pairs: Iterable[tuple[str, str]],
    read_file: Callable[[str], torch.Tensor],
    read_model: Callable[[str], torch.Tensor],
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    model_dtype: Callable[[str], torch.dtype] | None = None,
    delta_dtype: Callable[[str], torch.dtype] | None = None,
    progress: Callable[[int, int], None] | None = None,
    input_name: str = "eraser",
) -> WeightDiff:
    """``ΔW = W_file − W_model`` for each ``(file_key, model_key)`` pair, changed weights only.

    ``read_file`` and ``read_model`` return one tensor each (the model's as float32). Deltas are
    kept in float32, or in ``delta_dtype(model_key)`` (a 16-bit model's own dtype halves the memory
    a full erased UNet needs). A shape mismatch raises ErasureError naming the first offending
    key and the node input ``input_name`` the file came from, before anything is returned.
    """
    pairs = list(pairs)
    deltas: dict[str, torch.Tensor] = {}
    unchanged, skipped = 0, []
    for done, (file_key, model_key) in enumerate(pairs, 1):
        w_file = read_file(file_key)
        if not w_file.is_floating_point():
            skipped.append(file_key)
            continue
        expected = tuple(model_shapes[model_key])
        if tuple(w_file.shape) != expected:
            raise ErasureError(
                f"{input_name} weights must have the connected model's shapes, but '{file_key}' is "
                f"{tuple(w_file.shape)} and the model's '{model_key}' is {expected}. The {input_name} was made for "
                "another architecture (or another model size); pick the one for this model.",
                input_name=input_name)
        w_model = read_model(model_key).float()
        delta = w_file.float() - w_model
        dtypes = (w_file.dtype, model_dtype(model_key) if model_dtype else torch.float32)
        scale = max(float(w_model.abs().max()), float(w_file.float().abs().max()), 1e-12)
        if float(delta.abs().max()) <= rounding_tolerance(*dtypes) * scale:
            unchanged += 1
        else:
            deltas[model_key] = delta.to(delta_dtype(model_key)) if delta_dtype else delta
        if progress is not None:
            progress(done, len(pairs))
    return WeightDiff(deltas, unchanged, len(pairs) - len(skipped), tuple(skipped))


@dataclass(frozen=True)
class KeyFit:
    key: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float


@dataclass(frozen=True)
class ExtractionReport:
    fits: tuple[KeyFit, ...]
    dense_bytes: int
    factor_bytes: int

    @property
    def max_error(self) -> float:
        return max((f.rel_error for f in self.fits), default=0.0)

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.fits), default=0)

    def summary(self) -> str:
        if not self.fits:
            return "no weight differs from the model: nothing extracted"
        ranks = sorted(f.rank for f in self.fits)
        worst = max(self.fits, key=lambda f: f.rel_error)
        return (f"{len(self.fits)} weights, rank {ranks[0]}-{ranks[-1]} (median {ranks[len(ranks) // 2]}), "
                f"relative Frobenius error max {worst.rel_error:.3g} ('{worst.key}'), "
                f"{self.dense_bytes / 2**20:.1f} MiB of differences -> {self.factor_bytes / 2**20:.2f} MiB")


def _top_singular(matrix: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading singular triplets of ``matrix`` (float32): all of them by a full SVD when the
    rank cap is a large share of the dimension, else the top ``max_rank + 8`` by a seeded
    randomized SVD with 4 power iterations (Halko et al.), which is exact for the leading
    values of a matrix whose spectrum decays and many times faster on 1280-wide weights."""
    smallest = min(matrix.shape)
    q = min(smallest, max_rank + 8)
    if q >= smallest // 2:
        return torch.linalg.svd(matrix, full_matrices=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=4)
    return u, s, v.T


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    if delta.ndim == 1:
        return delta.reshape(-1, 1)
    return delta.reshape(delta.shape[0], -1)


@torch.no_grad()
def extract_low_rank(
    deltas: Mapping[str, torch.Tensor],
    *,
    max_rank: int = 64,
    max_error: float = 0.05,
    meta: Mapping[str, object] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    input_name: str = "erased_file",
) -> tuple[PatchSet, ExtractionReport]:
    """Low-rank factors of each ``ΔW`` (smallest rank with relative error ≤ ``max_error``, at most
    ``max_rank``); returns the PatchSet and the per-key rank and error. A difference whose SVD is
    not finite blames ``input_name``, the input the differences came from."""
    if max_rank < 1:
        raise ConfigError(f"max_rank must be at least 1, but got {max_rank}.", input_name="max_rank")
    if not 0.0 <= max_error < 1.0:
        raise ConfigError(f"max_error must be in [0, 1), but got {max_error}.", input_name="max_error")
    entries: dict[str, PatchEntry] = {}
    fits: list[KeyFit] = []
    dense_bytes = 0
    shapes: dict[str, list[int]] = {}
    for done, (key, delta) in enumerate(deltas.items(), 1):
        matrix = _as_matrix(delta).to(device=device, dtype=torch.float32)
        dense_bytes += delta.numel() * 2  # as a float16 checkpoint would store it
        total = float(torch.linalg.matrix_norm(matrix.double()))
        if total == 0.0:
            continue
        u, s, vh = _top_singular(matrix, max_rank)
        if not bool(torch.isfinite(s).all()):
            raise NumericalError(f"the SVD of the difference at '{key}' is not finite.", input_name=input_name)
        # residual after rank r: ‖ΔW‖_F² − Σ_{i<r} s_i² (Eckart–Young)
        captured = torch.cat([s.new_zeros(1, dtype=torch.float64), torch.cumsum(s.double().pow(2), 0)])
        rel = (total**2 - captured).clamp_min(0).sqrt() / total
        ok = (rel <= max_error).nonzero()
        rank = int(ok[0]) if len(ok) else len(s)
        rank = max(1, min(rank, max_rank, len(s)))
        up = (u[:, :rank] * s[:rank]).float().cpu().contiguous()
        down = vh[:rank].float().cpu().contiguous()
        entries[key] = PatchEntry(up=up, down=down)
        if tuple(delta.shape) != tuple(matrix.shape):
            shapes[key] = list(delta.shape)
        # the error actually stored, measured (not estimated from the spectrum)
        error = float(torch.linalg.matrix_norm(matrix - up.to(matrix.device) @ down.to(matrix.device))) / total
        fits.append(KeyFit(key, tuple(delta.shape), rank, error))
        if progress is not None:
            progress(done, len(deltas))
    report = ExtractionReport(tuple(fits), dense_bytes,
                              sum(e.up.numel() + e.down.numel() for e in entries.values()) * 4)
    full_meta = dict(meta or {}) | {"method": "extracted", "max_rank": max_rank, "max_error": max_error,
                                    "weight_shapes": shapes,
                                    "fits": {f.key: [f.rank, round(f.rel_error, 6)] for f in fits}}
    return PatchSet(entries, full_meta), report
