"""AttackPrompt's options: defaults from the papers, ranges, help (the node's widgets and tooltips)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..concept_text import MAX_TEXT_CHARS
from ..config import option, validate_ranges
from ..errors import ConceptError, shown

__all__ = ["MAX_PAIRS", "AttackConfig", "AttackMode", "check_prompt_size", "parse_pairs"]

MAX_PAIRS = 256
"""Most ``with | without`` lines concept_vector averages. Each pair is encoded twice, one CLIP call
at a time, and every encoding is held until the mean is taken; a few dozen pairs already give a
clean direction."""


class AttackMode(str, Enum):
    CLOSED_FORM = "closed_form"
    CONCEPT_VECTOR = "concept_vector"
    SOFT_PROMPT = "soft_prompt"


@dataclass(frozen=True)
class AttackConfig:
    mode: AttackMode = option(
        AttackMode.CONCEPT_VECTOR,
        "closed_form (RECE): the embedding the erased cross-attention maps closest to the original's "
        "response to the concept; needs original_model; seconds. concept_vector (Ring-A-Bell): carrier "
        "prompt + strength × concept direction, text encoder only; optional token search for a readable "
        "prompt. soft_prompt: gradient-optimised prefix tokens so the erased model predicts the noise the "
        "original predicts for the concept; needs original_model; SD1.x/SD2.x.")
    random_seed: int = option(0, "Seed of every random choice (token search, prefix start, noise "
                                 "samples): the same seed gives the same attack.", min=0, max=2**32 - 1)
    reg: float = option(1e-3, "closed_form: ridge λ, relative to the mean eigenvalue of Σ W'ᵀW' over the "
                              "sites. Smaller recovers more exactly with a larger, less natural embedding; "
                              "0 is the exact least-squares preimage.", min=0.0, max=100.0, step=1e-4)
    strength: float = option(3.0, "concept_vector: η, how far the carrier is pushed along the concept "
                                  "direction (Ring-A-Bell: 3 for nudity, about 1 for styles).",
                             min=0.0, max=20.0, step=0.1)
    search_steps: int = option(0, "concept_vector: generations of the genetic token search that turns the "
                                   "target into a readable prompt (0 = no search: the conditioning is the "
                                   "continuous target). Each generation encodes population/2 prompts.",
                               min=0, max=3000)
    search_tokens: int = option(16, "concept_vector: tokens in the searched prompt (Ring-A-Bell K = 16).",
                                min=1, max=75)
    search_population: int = option(64, "concept_vector: prompts per generation (paper 200; 64 is a "
                                         "quicker default).", min=4, max=512)
    prefix_tokens: int = option(3, "soft_prompt: learned tokens put before the concept prompt "
                                   "(UnlearnDiffAtk: 3 for styles and objects, 5 for nudity).", min=1, max=16)
    steps: int = option(30, "soft_prompt: optimisation steps (AdvUnlearn's attack: 30).", min=1, max=1000)
    lr: float = option(1e-2, "soft_prompt: Adam learning rate on the word embeddings.", min=1e-5, max=1.0,
                       step=1e-4)
    noise_samples: int = option(4, "soft_prompt: noised latents (timestep, noise) the loss averages over, "
                                   "fixed by the seed.", min=1, max=32)

    def __post_init__(self) -> None:
        validate_ranges(self)


def check_prompt_size(text: str, input_name: str) -> None:
    """Refuse a typed prompt (concept, carrier) over :data:`MAX_TEXT_CHARS` before it is tokenised:
    CLIP reads one 75-token window of it."""
    if len(text) > MAX_TEXT_CHARS:
        raise ConceptError(f"{input_name} must be one prompt of at most {MAX_TEXT_CHARS:,} characters, but got "
                           f"{len(text):,}. Type one prompt (CLIP reads 75 tokens).", input_name=input_name)


def parse_pairs(text: str, concept: str) -> list[tuple[str, str]]:
    """``'with | without'`` lines -> pairs; none given: the concept alone against the empty prompt.
    At most :data:`MAX_TEXT_CHARS` characters and :data:`MAX_PAIRS` pairs, checked before any
    encoding."""
    if len(text) > MAX_TEXT_CHARS:
        raise ConceptError(f"pairs must be at most {MAX_TEXT_CHARS:,} characters, but got {len(text):,}. Keep "
                           f"at most {MAX_PAIRS} pairs (a few dozen give a clean direction).", input_name="pairs")
    pairs, lines = [], text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.count("|") != 1:
            raise ConceptError(f"each line of pairs must be 'prompt with the concept | the same prompt "
                               f"without it', but line {number} is {shown(line.strip())}.", input_name="pairs")
        with_c, without = (part.strip() for part in line.split("|"))
        if not with_c or with_c == without:
            raise ConceptError(f"line {number} of pairs must have a prompt with the concept that differs "
                               "from the one without it.", input_name="pairs")
        if len(pairs) == MAX_PAIRS:
            count = len(pairs) + 1 + sum(1 for rest in lines[number:]
                                         if rest.strip() and not rest.lstrip().startswith("#"))
            raise ConceptError(f"pairs must hold at most {MAX_PAIRS} pairs, but got {count:,}. Keep the pairs "
                               "that best isolate the concept (a few dozen give a clean direction).",
                               input_name="pairs")
        pairs.append((with_c, without))
    return pairs or [(concept.strip(), "")]
