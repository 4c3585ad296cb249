"""``python -m erasure_core demo``: erase a built-in concept list from a randomly initialised
full-size SD1.5-shaped model (32 K/V sites, CLIP-L-shaped text encoder) and print what changed.
No ComfyUI, no downloads; the CLIP merges file comes from open-clip-torch or --merges."""

from __future__ import annotations

import argparse
import time

import torch

from .. import AttentionSite, ConceptSet, TokenPick, erase, make_config, reference_site_shapes
from ..text.clip import BPETokenizer, ClipTextEncoder
from .common import MemoEncoder, StderrProgress, kv_check

DEMO_TARGETS = "Van Gogh; Claude Monet; Salvador Dali; Pablo Picasso; Andy Warhol"
DEMO_PRESERVE = "Rembrandt; Johannes Vermeer; a photo of a cat"


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo", help="erase a built-in concept list from a random SD1.5-shaped model (no weights needed)",
        description="Erase concepts with UCE from a randomly initialised full-size SD1.5-shaped model (the 32 "
                    "cross-attention K/V weights and a CLIP-L-shaped text encoder, seeded) and print, per K/V "
                    "weight, how far the targets moved onto the anchor and how much the preserved prompts moved. "
                    "Ends with a line saying whether the erasure worked. Needs only torch and CLIP's merges file.")
    d.add_argument("--targets", default=DEMO_TARGETS,
                   help="concepts to erase, ';'-separated ('name | alias -> anchor' as in Load Concepts) "
                        "(default: %(default)s)")
    d.add_argument("--anchor", default="a painter", help="what every target becomes; '' erases toward nothing "
                                                         "(default: %(default)s)")
    d.add_argument("--preserve", default=DEMO_PRESERVE,
                   help="concepts whose K/V must not move, ';'-separated; '' for none (default: %(default)s)")
    d.add_argument("--token-pick", default=TokenPick.LAST_WORD_EOT_PADDING.value, choices=[p.value for p in TokenPick],
                   help="which token rows are edited (default: %(default)s, the UCE paper's)")
    d.add_argument("--merges", default=None, help="CLIP's BPE merges file (default: the one inside open-clip-torch)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random model (default: %(default)s)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    d.add_argument("--save", default=None, help="also write the edit as a concept-erasure patch file (.safetensors)")
    d.set_defaults(run=run)


def _sites(seed: int) -> list[AttentionSite]:
    gen = torch.Generator().manual_seed(seed)
    return [AttentionSite(k, torch.randn(shape, generator=gen) / shape[1] ** 0.5)
            for k, shape in reference_site_shapes("sd1").items() if "attn2" in k]


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    encoder = MemoEncoder(ClipTextEncoder(tokenizer=BPETokenizer(args.merges), seed=args.seed))
    sites = _sites(args.seed)
    concepts = ConceptSet.from_text(args.targets, args.anchor, args.preserve)
    config = make_config("uce", token_pick=TokenPick(args.token_pick))
    t1 = time.perf_counter()
    patch = erase("uce", sites, concepts, encoder, config, progress=StderrProgress("erase"))
    t2 = time.perf_counter()
    check = kv_check(sites, patch, concepts, encoder, config.token_pick)
    print(f"UCE on a random SD1.5-shaped model ({len(sites)} K/V sites, CLIP-L width 768)")
    print(f"targets: {', '.join(concepts.target_names)} -> '{concepts.anchors[0] or '(nothing)'}'; "
          f"preserved: {', '.join(p.name for p in concepts.preserve) or '-'} (+ the empty prompt)")
    print(f"build {t1 - t0:.2f} s | erase (encode + solve) {t2 - t1:.2f} s | rank {patch.max_rank} | "
          f"patch {patch.nbytes / 2**20:.2f} MiB\n")
    print(f"{'site':72} {'shape':>11} {'|dW|/|W|':>9} {'target->anchor':>15} {'preserved drift':>16}")
    for site, row in zip(sites, check.sites, strict=True):
        print(f"{site.key:72} {str(tuple(site.weight.shape)):>11} "
              f"{row.relative_change:9.4f} {row.gap_left:14.2%} {row.drift:15.3%}")
    print("\ntarget->anchor: distance of the targets' K/V from the anchor's original K/V, as a share "
          "of the distance before the edit (0% = fully mapped). preserved drift: change of the "
          "preserved prompts' K/V relative to their size.")
    if args.save:
        patch.save(args.save)
        print(f"saved the patch to {args.save}")
    print(check.verdict())
    return 0
