"""Ring-A-Bell (Tsai et al., ICLR 2024; research/attacks_eval.md §A.3): text encoder only.

The concept direction is the mean difference of full encodings of paired prompts with and without
the concept, ``c = mean_i [E(p_i⁺) − E(p_i⁻)]`` (``[T, D]``). The attack target is
``E(carrier) + η c``; used directly it is a CONDITIONING (the "continuous" variant RECE's authors
re-implemented). :func:`genetic_search` turns it into a readable prompt: ``K`` token ids minimising
``‖target − E(ids)‖²`` by an elitist genetic algorithm (the best never gets worse), seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConceptError, ConfigError
from ..text.clip import _byte_alphabet

__all__ = ["SearchResult", "concept_direction", "decode_bpe_tokens", "genetic_search"]

EncodeIds = Callable[[torch.Tensor], torch.Tensor]
"""``encode_ids(ids [N, K]) -> hidden [N, T, D]``: the prompts made of those tokens (start, the ids,
end, padding), encoded by the text encoder."""


def concept_direction(with_concept: torch.Tensor, without_concept: torch.Tensor) -> torch.Tensor:
    """``mean_i [E(p_i⁺) − E(p_i⁻)]`` over paired encodings ``[N, T, D]`` -> ``[T, D]`` (float32)."""
    if with_concept.shape != without_concept.shape or with_concept.ndim != 3 or with_concept.shape[0] == 0:
        raise ConceptError(
            "the concept vector needs at least one pair of prompts encoded to one shape, but got "
            f"{tuple(with_concept.shape)} and {tuple(without_concept.shape)}. Give pairs as "
            "'prompt with the concept | the same prompt without it', one per line.", input_name="pairs")
    return (with_concept.double() - without_concept.double()).mean(0).float()


@dataclass(frozen=True)
class SearchResult:
    """Best token ids ``[K]``, their objective ``‖target − E(ids)‖²``, the best objective after each
    generation (``history[0]`` is the initial population's best), and the number of encodings."""

    ids: torch.Tensor
    objective: float
    history: list[float]
    evaluations: int


def _objective(target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return ((hidden.float() - target.float()) ** 2).flatten(1).sum(1)  # [N]


@torch.no_grad()
def genetic_search(
    target: torch.Tensor,
    encode_ids: EncodeIds,
    vocabulary: torch.Tensor,
    *,
    length: int,
    generations: int,
    population: int,
    seed: int,
    mutation: float = 0.25,
    crossover: float = 0.5,
    patience: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """Ring-A-Bell's genetic algorithm over ``length`` tokens drawn from ``vocabulary`` (ids).

    Each generation keeps the better half (elitism: the best is never lost, so ``history`` never
    increases), refills the population with children of two random elites (single-point crossover
    with probability ``crossover``, else a copy of the first) and mutates each child at one random
    position with probability ``mutation``. Stops after ``generations``, or after ``patience``
    generations without improvement (0: never early). Every random draw comes from ``seed``.
    """
    if length < 1 or population < 2 or generations < 0:
        raise ConfigError(f"the search needs length ≥ 1, population ≥ 2 and generations ≥ 0, but got "
                          f"{length}, {population}, {generations}.", input_name="search_steps")
    if vocabulary.numel() == 0:
        raise ConfigError("the search needs a non-empty vocabulary.", input_name="clip")
    gen = torch.Generator().manual_seed(int(seed))
    vocabulary = vocabulary.long().cpu()

    def draw(*shape: int) -> torch.Tensor:
        return vocabulary[torch.randint(len(vocabulary), shape, generator=gen)]

    pop = draw(population, length)
    fitness = _objective(target, encode_ids(pop)).cpu()
    evaluations = population
    order = torch.argsort(fitness, stable=True)
    pop, fitness = pop[order], fitness[order]
    history = [float(fitness[0])]
    keep = max(1, population // 2)
    stale = 0
    for g in range(generations):
        elites, elite_fit = pop[:keep], fitness[:keep]
        n_children = population - keep
        first = torch.randint(keep, (n_children,), generator=gen)
        second = torch.randint(keep, (n_children,), generator=gen)
        cut = torch.randint(1, max(2, length), (n_children,), generator=gen)
        crossing = torch.rand(n_children, generator=gen) < crossover
        positions = torch.arange(length)[None, :]
        take_second = crossing[:, None] & (positions >= cut[:, None])
        children = torch.where(take_second, elites[second], elites[first])
        mutate = torch.rand(n_children, generator=gen) < mutation
        where = torch.randint(length, (n_children,), generator=gen)
        fresh = draw(n_children)
        rows = torch.nonzero(mutate).flatten()
        children[rows, where[rows]] = fresh[rows]
        child_fit = _objective(target, encode_ids(children)).cpu() if n_children else fitness[:0]
        evaluations += n_children
        pop = torch.cat([elites, children])
        fitness = torch.cat([elite_fit, child_fit])
        order = torch.argsort(fitness, stable=True)  # elites first among ties: deterministic
        pop, fitness = pop[order], fitness[order]
        improved = float(fitness[0]) < history[-1]
        history.append(float(fitness[0]))
        stale = 0 if improved else stale + 1
        if progress is not None:
            progress(g + 1, generations)
        if patience and stale >= patience:
            break
    return SearchResult(pop[0].clone(), float(fitness[0]), history, evaluations)


def decode_bpe_tokens(tokens: Sequence[str]) -> str:
    """CLIP BPE token strings (``'van</w>'``, byte-mapped characters) -> plain text."""
    inverse = {ch: b for b, ch in _byte_alphabet().items()}
    out = bytearray()
    for token in tokens:
        end = token.endswith("</w>")
        out += bytes(inverse[ch] for ch in (token[:-4] if end else token) if ch in inverse)
        if end:
            out += b" "
    return " ".join(out.decode("utf-8", errors="replace").split())
