"""The default preserve bank and the held-out probe prompts (issue #13 and the check of issue #12).

A closed-form edit moves every key that overlaps the erased rows. Preserving only the empty prompt
(the papers' default) leaves unrelated prompts free to move: in a full-size SD1.5 graph, erasing
"cat" with UCE's defaults moved "a red car on a street" by more than the whole cat–dog gap. The
bank is a small set of built-in prompts preserved by default: generic scenes plus neighbours of
each concept kind (other artists for an artist, other animals and objects for an object...). Its
encodings go through the same on-disk cache as every prompt, so it costs one encoding per text
encoder and nothing after that.

The probes are *other* built-in prompts of the same two sorts that are never preserved: the check
(``methods/check.py``) measures their drift, so the node reports collateral damage on prompts
that no list protected. Bank and probes never share a prompt; prompts that name a target (as a
whole word) are left out of both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..concept_text import normalise
from ..concepts import ConceptKind, ConceptSet

__all__ = ["BANK", "PROBES", "bank_prompts", "probe_prompts", "without_targets"]

# Built-in prompts a default erasure preserves: generic scenes (every kind), then each kind's
# neighbours. Keep them short and literal: they stand for "everything else a user prompts".
BANK: dict[str, tuple[str, ...]] = {
    "*": (
        "a photo of a person", "a landscape with trees and a river", "a house with a garden",
        "a plate of food", "a street in a city", "a portrait of a woman", "an old painting",
        "a close-up photo of a flower", "a group of people talking", "a bedroom interior",
        "a beach with waves", "a forest in autumn", "a dog in a park", "a child playing with a ball",
        "a cat sleeping on a sofa", "a bridge over a river", "a desert at noon", "a train station",
        "an office with computers", "a man cooking in a kitchen", "a field of wheat", "a lighthouse on a cliff",
        "a castle on a hill", "a rainy street at night", "a market with fruit stalls", "a woman reading a book",
        "a boat on a lake", "a church tower", "a garden with roses", "a family having dinner",
        "a snowy forest", "an airplane in the sky", "a farm with cows", "a living room with a fireplace",
        "a waterfall in the jungle", "a busy restaurant", "a sunset over the ocean", "a modern building",
        "a soldier in uniform", "a fantasy landscape", "a cartoon drawing", "a black and white photograph",
    ),
    ConceptKind.GENERIC.value: ("a photo of a horse", "a bird on a branch", "a photo of a chair",
                                "a bicycle"),
    ConceptKind.OBJECT.value: ("a photo of a horse", "a bird on a branch", "a photo of a chair",
                               "a bicycle", "a photo of a truck", "a cup of coffee"),
    ConceptKind.ARTIST.value: ("a painting by Claude Monet", "art by Rembrandt", "a painting by Frida Kahlo",
                               "artwork by Katsushika Hokusai", "a watercolor painting"),
    ConceptKind.CELEBRITY.value: ("a photo of Tom Hanks", "a photo of Meryl Streep", "a portrait of a man",
                                  "a photo of Denzel Washington", "a photo of an actress"),
    ConceptKind.CHARACTER.value: ("Mickey Mouse", "a drawing of Pikachu", "a cartoon of Homer Simpson",
                                  "a toy robot", "a cartoon character"),
    ConceptKind.EXPLICIT.value: ("a person wearing a coat", "a man in a suit", "a woman in a dress",
                                 "people at the beach", "a statue in a museum"),
}

# Held out: never preserved, only measured (the check's probe set).
PROBES: dict[str, tuple[str, ...]] = {
    "*": ("a snowy mountain village", "a bowl of soup", "a sailing ship", "a man riding a motorcycle",
          "a kitchen with a window"),
    ConceptKind.GENERIC.value: ("a photo of a rabbit", "a photo of a lamp"),
    ConceptKind.OBJECT.value: ("a photo of a rabbit", "a photo of a lamp", "a photo of a train"),
    ConceptKind.ARTIST.value: ("a painting by Paul Cezanne", "art by Gustav Klimt", "an oil painting"),
    ConceptKind.CELEBRITY.value: ("a photo of Brad Pitt", "a photo of Oprah Winfrey", "a photo of a singer"),
    ConceptKind.CHARACTER.value: ("a cartoon of Bugs Bunny", "a drawing of Sonic the Hedgehog", "a puppet"),
    ConceptKind.EXPLICIT.value: ("a person wearing a sweater", "a dancer on a stage", "a swimmer in a pool"),
}


def without_targets(prompts: Iterable[str], concepts: ConceptSet) -> list[str]:
    """``prompts`` that name no target or alias as a whole word (as SPEED drops retain entries),
    and that are not an erase prompt themselves; once each, in order."""
    names = [re.escape(n) for t in concepts.targets for n in t.names]
    pattern = re.compile(r"\b(" + "|".join(names) + r")\b", re.IGNORECASE) if names else None
    erased = {normalise(p) for p, _ in concepts.erase_pairs()}
    return list(dict.fromkeys(p for p in prompts if not (pattern and pattern.search(p))
                              and normalise(p) not in erased))


def _kinds(concepts: ConceptSet) -> list[str]:
    return list(dict.fromkeys(t.kind.value for t in concepts.targets))


def _collect(table: dict[str, tuple[str, ...]], concepts: ConceptSet) -> list[str]:
    return [*table["*"], *(p for kind in _kinds(concepts) for p in table.get(kind, ()))]


def bank_prompts(concepts: ConceptSet, exclude: Sequence[str] = ()) -> list[str]:
    """The default preserve bank for ``concepts``: generic prompts plus their kinds' neighbours,
    without prompts naming a target and without ``exclude`` (prompts already preserved)."""
    skip = {normalise(p) for p in exclude}
    return [p for p in without_targets(_collect(BANK, concepts), concepts) if normalise(p) not in skip]


def probe_prompts(concepts: ConceptSet, preserved: Sequence[str] = ()) -> list[str]:
    """Held-out probes for ``concepts``: built-in generic prompts and neighbours of the targets'
    kinds that are in no list (neither preserved nor erased)."""
    skip = {normalise(p) for p in preserved} | {normalise(a) for _, a in concepts.erase_pairs()}
    return [p for p in without_targets(_collect(PROBES, concepts), concepts) if normalise(p) not in skip]
