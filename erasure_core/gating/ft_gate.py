"""Facilitated Transport (FT): how strongly an erasure adapter acts for one prompt.

SPM (Lyu et al., CVPR 2024; ``research/algorithms.md`` §5.3) scales each membrane by a gate
computed from the prompt the user samples and the concept texts the membrane was trained on:

    gate = facilitate_factor * max_t max( clipcos(p, t), tokenuni(p, t) )

* ``clipcos(p, t)``: cosine between the *flattened* per-token sequences of the prompt and of the
  target text (SD1.x: 77 x 768 last hidden states, padding included), one number per target.
* ``tokenuni(p, t) = |tokens(p) & tokens(t)| / |tokens(t)|``: the share of the target's distinct
  vocabulary tokens that the prompt also contains, special tokens (start, end, pad, unknown)
  removed. A target with no ordinary token scores 0 (the released script divides by zero there).
* the max runs over the membrane's target texts; there is no threshold.

The functions take plain tensors and token-id lists, so any caller (Apply SPM, Apply Eraser LoRA,
the CLI) can feed them from its own encoder. Nothing here imports ComfyUI.

Public API (kept stable for other nodes):

* :data:`METRICS` -- the metric names (``clipcos_tokenuni`` is the reference default).
* :func:`clipcos` -- ``[K]`` cosines of one prompt against K targets.
* :func:`tokenuni` -- ``[K]`` token-union overlaps of one prompt against K targets.
* :func:`ft_gate` -- the gate and its parts, as an :class:`FTGate`.
* :func:`gate_concepts` -- a gate's distinct target texts, at most :data:`MAX_GATE_CONCEPTS`.
* :func:`gate_targets` -- those of a node's gate: typed, else recorded in its file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConceptError, ConfigError, shown, shown_list

__all__ = ["MAX_GATE_CONCEPTS", "METRICS", "FTGate", "clipcos", "ft_gate", "gate_concepts", "gate_targets", "tokenuni"]

METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni")
"""Matching metrics of the reference script; ``clipcos_tokenuni`` (the max of both) is its default."""

MAX_GATE_CONCEPTS = 1024
"""Most distinct target texts one gate compares the prompt with. Each is encoded (77 tokens x the
CLIP width, float32: 0.24 MB on SD1.x) and held until the gate is taken. A released SPM names one
concept; an erasure of 1,000 concepts (the largest in the papers) records them all and still fits."""


def gate_concepts(concepts: Iterable[str], input_name: str, source: str, fix: str) -> tuple[str, ...]:
    """The distinct ``concepts`` in their order, refused past :data:`MAX_GATE_CONCEPTS` with a
    message naming ``source`` (where they came from) and ``fix`` (how to get under the limit)."""
    distinct = tuple(dict.fromkeys(concepts))
    if len(distinct) > MAX_GATE_CONCEPTS:
        raise ConceptError(
            f"the gate compares the prompt with each concept, at most {MAX_GATE_CONCEPTS:,}, but {source} lists "
            f"{len(distinct):,} distinct concepts ({shown_list(distinct, show=shown)}). {fix}",
            input_name=input_name)
    return distinct


def gate_targets(typed: Iterable[str], recorded: Iterable[str], typed_input: str, file_input: str,
                 file_source: str) -> tuple[str, ...]:
    """A gate's distinct concepts: the ``typed`` ones (a node's concept widget ``typed_input``), else
    those ``recorded`` in the file picked in ``file_input`` (``file_source`` words where), at most
    :data:`MAX_GATE_CONCEPTS`, refused naming the input they came from."""
    typed = tuple(typed)
    if typed:
        return gate_concepts(typed, typed_input, typed_input,
                             f"Keep at most {MAX_GATE_CONCEPTS:,} concepts the gate should respond to.")
    return gate_concepts(recorded, file_input, file_source,
                         f"Type the concepts to gate against in {typed_input}: it replaces the file's list.")


def _as_targets(target_hidden: torch.Tensor) -> torch.Tensor:
    return target_hidden.unsqueeze(0) if target_hidden.ndim == 2 else target_hidden


def clipcos(prompt_hidden: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
    """Cosine of the flattened sequences: ``prompt_hidden`` ``[T, D]`` against ``target_hidden``
    ``[K, T, D]`` (or one target ``[T, D]``); returns ``[K]`` float64 on the CPU.

    Both must have the same ``T`` and ``D`` (the same encoder and window length); computed in
    float64 so the gate does not depend on the encoder's storage precision. A zero sequence has
    cosine 0.
    """
    targets = _as_targets(target_hidden)
    if prompt_hidden.ndim != 2 or targets.ndim != 3 or targets.shape[1:] != prompt_hidden.shape:
        raise ConfigError(
            f"clipcos needs a prompt [T, D] and targets [K, T, D] of the same T and D, but got "
            f"{tuple(prompt_hidden.shape)} and {tuple(target_hidden.shape)}. Encode both with the "
            "same text encoder and window length.", input_name="clip")
    p = prompt_hidden.detach().to("cpu", torch.float64).flatten()
    t = targets.detach().to("cpu", torch.float64).flatten(1)
    return (t @ p) / (t.norm(dim=1) * p.norm()).clamp_min(1e-300)


def _token_set(ids: Iterable[int] | torch.Tensor, special: frozenset[int]) -> set[int]:
    values = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
    # Negative ids mark positions that hold an embedding vector rather than a vocabulary token.
    return {int(i) for i in values if int(i) >= 0 and int(i) not in special}


def tokenuni(prompt_ids: Sequence[int] | torch.Tensor, target_ids: Sequence[Sequence[int] | torch.Tensor],
             special_ids: Iterable[int]) -> torch.Tensor:
    """``[K]`` float64: for each target, the share of its distinct ordinary tokens found in the
    prompt. ``special_ids`` (start, end, pad, unknown) and negative ids are ignored on both sides."""
    special = frozenset(int(i) for i in special_ids)
    prompt = _token_set(prompt_ids, special)
    scores = []
    for ids in target_ids:
        target = _token_set(ids, special)
        scores.append(len(prompt & target) / len(target) if target else 0.0)
    return torch.tensor(scores, dtype=torch.float64)


@dataclass(frozen=True)
class FTGate:
    """The gate of one membrane for one prompt, with the numbers it came from.

    ``gate = facilitate_factor * raw``; ``raw`` is the max over targets of ``score``; ``score[k]``
    is ``max(clipcos[k], tokenuni[k])`` for ``clipcos_tokenuni`` (or the single metric);
    ``best`` is the index of the target that gave ``raw``. Unused metrics hold ``None``.
    """

    gate: float
    raw: float
    facilitate_factor: float
    best: int
    score: tuple[float, ...]
    clipcos: tuple[float, ...] | None
    tokenuni: tuple[float, ...] | None
    metric: str = "clipcos_tokenuni"

    def describe(self, targets: Sequence[str] | None = None) -> str:
        """``gate 0.873 (clipcos 0.873, tokenuni 0.500 vs 'snoopy')`` for reports."""
        parts = []
        if self.clipcos is not None:
            parts.append(f"clipcos {self.clipcos[self.best]:.3f}")
        if self.tokenuni is not None:
            parts.append(f"tokenuni {self.tokenuni[self.best]:.3f}")
        against = f" vs {shown(targets[self.best])}" if targets is not None and self.best < len(targets) else ""
        factor = f" x factor {self.facilitate_factor:g}" if self.facilitate_factor != 1.0 else ""
        return f"gate {self.gate:.3f} ({', '.join(parts)}{against}{factor})"


def ft_gate(
    prompt_hidden: torch.Tensor | None,
    prompt_ids: Sequence[int] | torch.Tensor | None,
    target_hidden: torch.Tensor | None,
    target_ids: Sequence[Sequence[int] | torch.Tensor] | None,
    special_ids: Iterable[int] = (),
    *,
    facilitate_factor: float = 1.0,
    metric: str = "clipcos_tokenuni",
) -> FTGate:
    """The FT gate of one membrane for one prompt.

    ``prompt_hidden`` ``[T, D]`` and ``target_hidden`` ``[K, T, D]``: per-token hidden states
    (needed by the ``clipcos`` metrics); ``prompt_ids`` and ``target_ids`` (K id sequences):
    token ids (needed by the ``tokenuni`` metrics); ``special_ids``: token ids to leave out of
    tokenuni. Returns an :class:`FTGate`; ``gate`` is what the membrane's multiplier becomes.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, but got {metric!r}.", input_name="metric")
    if not (facilitate_factor == facilitate_factor and abs(facilitate_factor) != float("inf")):
        raise ConfigError(f"facilitate_factor must be a finite number, but got {facilitate_factor}.",
                          input_name="facilitate_factor")
    cos = uni = None
    if "clipcos" in metric:
        if prompt_hidden is None or target_hidden is None:
            raise ConfigError(f"metric {metric!r} needs the prompt's and the targets' hidden states.",
                              input_name="metric")
        cos = clipcos(prompt_hidden, target_hidden)
    if "tokenuni" in metric:
        if prompt_ids is None or target_ids is None:
            raise ConfigError(f"metric {metric!r} needs the prompt's and the targets' token ids.",
                              input_name="metric")
        uni = tokenuni(prompt_ids, target_ids, special_ids)
    if cos is not None and uni is not None and cos.shape != uni.shape:
        raise ConfigError(f"clipcos has {cos.numel()} targets but tokenuni {uni.numel()}; pass the same "
                          "targets to both.", input_name="targets")
    parts = [s for s in (cos, uni) if s is not None]
    score = torch.stack(parts).amax(0)
    if score.numel() == 0:
        raise ConfigError("the membrane needs at least one target text to gate against, but got none.",
                          input_name="targets")
    best = int(score.argmax())
    raw = float(score[best])
    return FTGate(
        gate=facilitate_factor * raw,
        raw=raw,
        facilitate_factor=float(facilitate_factor),
        best=best,
        score=tuple(score.tolist()),
        clipcos=None if cos is None else tuple(cos.tolist()),
        tokenuni=None if uni is None else tuple(uni.tolist()),
        metric=metric,
    )
