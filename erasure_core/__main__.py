"""Command line: ``python -m erasure_core demo`` erases a built-in concept list from a randomly
initialised full-size model (SD1.5 or SDXL K/V shapes, CLIP-L text encoder) and prints what
changed. No ComfyUI, no downloads; the CLIP merges file comes from open-clip-torch or --merges."""

from __future__ import annotations

import argparse
import time

import torch

from . import AttentionSite, ConceptSet, TokenPick, erase, make_config, reference_site_shapes
from .text.clip import BPETokenizer, ClipTextEncoder
from .text.encoded import erase_rows, preserve_rows

DEMO_TARGETS = "Van Gogh; Claude Monet; Salvador Dali; Pablo Picasso; Andy Warhol"
DEMO_PRESERVE = "Rembrandt; Johannes Vermeer; a photo of a cat"


def _sites(seed: int) -> list[AttentionSite]:
    gen = torch.Generator().manual_seed(seed)
    return [AttentionSite(k, torch.randn(shape, generator=gen) / shape[1] ** 0.5)
            for k, shape in reference_site_shapes("sd1").items() if "attn2" in k]


def demo(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    t0 = time.perf_counter()
    encoder = ClipTextEncoder(tokenizer=BPETokenizer(args.merges), seed=args.seed)
    sites = _sites(args.seed)
    concepts = ConceptSet.from_text(args.targets, args.anchor, args.preserve)
    config = make_config("uce", token_pick=TokenPick(args.token_pick))
    t1 = time.perf_counter()
    patch = erase("uce", sites, concepts, encoder, config)
    t2 = time.perf_counter()
    pairs, keep = concepts.erase_pairs(), concepts.preserve_prompts()
    enc = encoder([p for pair in pairs for p in pair] + keep)
    ce, ca = erase_rows(enc, pairs, config.token_pick)
    cp = preserve_rows(enc, keep, config.token_pick)
    print(f"UCE on a random SD1.5-shaped model ({len(sites)} K/V sites, CLIP-L width 768)")
    print(f"targets: {', '.join(concepts.target_names)} -> '{concepts.anchors[0] or '(nothing)'}'; "
          f"preserved: {', '.join(p.name for p in concepts.preserve) or '-'} (+ the empty prompt)")
    print(f"build {t1 - t0:.2f} s | erase (encode + solve) {t2 - t1:.2f} s | rank {patch.max_rank} | "
          f"patch {patch.nbytes / 2**20:.2f} MiB\n")
    print(f"{'site':72} {'shape':>11} {'|dW|/|W|':>9} {'target->anchor':>15} {'preserved drift':>16}")
    for site in sites:
        w0 = site.weight.double()
        w1 = w0 + patch[site.key].dense().double()
        before = (w0 @ (ce - ca).double().T).norm()
        after = (w1 @ ce.double().T - w0 @ ca.double().T).norm()
        drift = ((w1 - w0) @ cp.double().T).norm() / (w0 @ cp.double().T).norm()
        print(f"{site.key:72} {str(tuple(site.weight.shape)):>11} "
              f"{(w1 - w0).norm() / w0.norm():9.4f} {after / before:14.2%} {drift:15.3%}")
    print("\ntarget->anchor: distance of the targets' K/V from the anchor's original K/V, as a share "
          "of the distance before the edit (0% = fully mapped). preserved drift: change of the "
          "preserved prompts' K/V relative to their size.")
    if args.save:
        patch.save(args.save)
        print(f"saved the patch to {args.save}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m erasure_core")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="erase a built-in concept list from a random SD1.5-shaped model")
    d.add_argument("--targets", default=DEMO_TARGETS)
    d.add_argument("--anchor", default="a painter")
    d.add_argument("--preserve", default=DEMO_PRESERVE)
    d.add_argument("--token-pick", default=TokenPick.LAST_WORD_EOT_PADDING.value,
                   choices=[p.value for p in TokenPick])
    d.add_argument("--merges", default=None, help="CLIP merges.txt (default: open-clip-torch's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--save", default=None, help="write the patch to this .safetensors file")
    args = parser.parse_args()
    demo(args)


if __name__ == "__main__":
    main()
