"""Time of AttackPrompt's text-side work on full-size SD1.5 shapes (no ComfyUI, no downloads).

The 32 K/V sites of a full-size SD1.5 UNet and a full CLIP ViT-L/14 text encoder, seeded random
weights, the real BPE tokenizer. Measures: the Gram sums over the sites (``kv_grams``), the
closed-form attack and its recovery score, and one generation of the concept_vector token search
(``population / 2`` encodings of 77 tokens). The soft prompt needs a real UNet: it is timed in a
graph, not here. Run ``python benchmarks/bench_attack.py [--population 64] [--generations 3]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import erasure_core as ec  # noqa: E402
from erasure_core.attacks import closed_form_attack, concept_direction, genetic_search, kv_grams  # noqa: E402
from erasure_core.attacks.recovery import kv_recovery  # noqa: E402
from erasure_core.text.clip import BPETokenizer, ClipTextEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    shapes = ec.reference_site_shapes("sd1")
    sites = [ec.AttentionSite(k, torch.randn(s, generator=gen) / s[1] ** 0.5)
             for k, s in shapes.items() if k.endswith(("to_k.weight", "to_v.weight"))]
    tokenizer = BPETokenizer()
    encoder = ClipTextEncoder(tokenizer=tokenizer, seed=0)
    concepts = ec.ConceptSet.simple(("Van Gogh",), ("a painter",), ())
    patch = ec.erase("uce", sites, concepts, encoder, ec.make_config("uce"))
    erased = [ec.AttentionSite(s.key, s.weight + patch[s.key].dense()) for s in sites]
    concept = encoder(["Van Gogh"]).hidden[0]

    started = time.perf_counter()
    grams = kv_grams(erased, sites)
    t_grams = time.perf_counter() - started
    started = time.perf_counter()
    attack = closed_form_attack(concept, grams, 1e-3)
    score = kv_recovery(grams, attack, concept)
    t_attack = time.perf_counter() - started
    print(f"sites {len(sites)}; kv_grams {t_grams:.3f} s; closed_form + score {t_attack:.3f} s; "
          f"recovery {score.score:.4f} at reg 1e-3")

    direction = concept_direction(encoder(["a painting by Van Gogh"]).hidden, encoder(["a painting"]).hidden)
    target = encoder(["a village at night"]).hidden[0] + 3.0 * direction

    def encode_ids(ids: torch.Tensor) -> torch.Tensor:
        full = torch.full((len(ids), 77), tokenizer.end_id, dtype=torch.long)
        full[:, 0] = tokenizer.start_id
        full[:, 1 : ids.shape[1] + 1] = ids
        return encoder.forward(full)

    started = time.perf_counter()
    result = genetic_search(target, encode_ids, torch.arange(49406), length=args.tokens,
                            generations=args.generations, population=args.population, seed=0)
    elapsed = time.perf_counter() - started
    per_gen = elapsed / (args.generations + 1)  # the initial population costs about two generations
    print(f"token search: population {args.population}, {args.generations} generations, {elapsed:.2f} s "
          f"({result.evaluations} encodings, {elapsed / result.evaluations * 1e3:.1f} ms each, "
          f"~{per_gen:.2f} s per generation); objective {result.history[0]:.1f} -> {result.objective:.1f}; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
