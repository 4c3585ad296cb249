"""Erasure against drift in LATENT space, inside real ComfyUI (issue #13): r and the worst drift of
five unrelated prompts as the preserve bank and the scales vary, on the checkpoint and sampler of
``tests/integration/test_safe_defaults_comfyui.py``.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_tradeoff.py [--methods uce] [--cfgs 1,7]

The checkpoint is the test's ``tiny_sd15`` (full-size CLIP-L with seeded random weights, SD1.5's
cross-attention widths, 7 attention layers), sampled by the test's helper (8x8 latent, 2 Euler
steps, seed 7, negative ''). "cat" is erased toward "dog" through Load Concepts and Closed-Form
Erase, as a user would; ``--list`` prints the settings, ``--settings`` picks some by name.

    r     = mean |latent(erased, "cat") − latent(original, "dog")| / mean |latent(original, "cat") − latent(original, "dog")|
    drift = mean |latent(erased, p) − latent(original, p)| / mean |latent(original, "a photo of a cat") − ... "a photo of a dog"|

Bank sizes: the built-in bank (``methods/bank.py``) is 45 prompts for a generic concept (46 preserved with the empty prompt); smaller
banks are its first N prompts, the larger ones add generated everyday prompts (subject x place,
none naming a cat, a dog or a word of the unrelated prompts) as preserve prompts with the built-in
bank off. Each setting costs 6 samples per CFG scale plus its erase (about a minute on 2 busy cores).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(ROOT, "tests", "integration")  # the test's checkpoint and sampler, so figures match
for path in (ROOT, HERE, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from bench_comfyui import _import_pack, _setup_comfy  # noqa: E402

_SUBJECTS = ("a woman", "a young boy", "a horse", "a bicycle", "a wooden chair", "a teapot", "a sailboat",
             "a violin", "a green parrot", "a farmer", "a lamp", "a tractor", "a knight", "a dancer",
             "a bus", "a pine tree", "a guitar", "a clock", "an elephant", "a robot")
_PLACES = ("in a field", "in a museum", "on a table", "in the snow", "at the beach", "in a garden",
           "in a workshop", "on a road", "in the rain", "in a library")
_AVOID = {"cat", "dog", "car", "street", "bowl", "fruit", "mountain", "lake", "sunset", "portrait", "old",
          "man", "city", "skyline", "night"}


def generated_prompts(n: int) -> list[str]:
    """``n`` everyday prompts (subject x place), none sharing a content word with the unrelated
    prompts or naming the target or anchor."""
    out = [f"{s} {p}" for p, s in itertools.product(_PLACES, _SUBJECTS)]
    out = [p for p in out if not _AVOID & set(p.split())]
    if n > len(out):
        raise SystemExit(f"at most {len(out)} generated prompts")
    return out[:n]


# name -> (method, options overrides, bank: None = the built-in default, else (built-in first N, generated M))
SETTINGS: dict[str, tuple[str, dict[str, object], tuple[int, int] | None]] = {
    "uce paper (no bank, λ 0.5)": ("uce", {"preserve_bank": False, "lamb": 0.5}, (0, 0)),
    "uce bank 16, λ 0.5": ("uce", {"lamb": 0.5}, (16, 0)),
    "uce bank 45, λ 0.5 (previous default)": ("uce", {"lamb": 0.5}, None),
    "uce bank 45 + 100, λ 0.5": ("uce", {"lamb": 0.5}, (45, 100)),
    "uce bank 45 + 200, λ 0.5": ("uce", {"lamb": 0.5}, (45, 200)),
    "uce bank 45, preserve scale 1, λ 0.5": ("uce", {"preserve_scale": 1.0, "lamb": 0.5}, None),
    "uce bank 45 + 200, preserve scale 1, λ 0.5": ("uce", {"preserve_scale": 1.0, "lamb": 0.5}, (45, 200)),
    "uce last subject token, bank 45, λ 0.5": ("uce", {"token_pick": "last subject token", "lamb": 0.5}, None),
    "uce bank 45, λ 5 (default)": ("uce", {"lamb": 5.0}, None),
    "uce bank 45, λ 15": ("uce", {"lamb": 15.0}, None),
    "uce bank 45, λ 50": ("uce", {"lamb": 50.0}, None),
    "uce bank 45 + 200, λ 5": ("uce", {"lamb": 5.0}, (45, 200)),
    "rece default": ("rece", {}, None),
    "speed default": ("speed", {}, None),
    "mace default": ("mace", {}, None),
    "realera default": ("realera", {}, None),
}


def _concepts(bank: tuple[int, int] | None):
    """The test's concepts ("cat" -> "dog", generic); with ``bank`` the preserve prompts instead of the default bank."""
    from concept_erasure_pack.erasure_core.methods.bank import bank_prompts
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    base = {"targets": "cat", "anchors": "dog", "kind": "generic", "preset": "none", "file": "none",
            "templates": "as given", "custom_templates": ""}
    with torch.inference_mode():
        (default,) = LoadConcepts.execute(preserve="", **base).result
        if bank is None:
            return default
        prompts = bank_prompts(default, exclude=[""])[: bank[0]] + generated_prompts(bank[1])
        (custom,) = LoadConcepts.execute(preserve="\n".join(prompts), **base).result
        return custom


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="uce", help="comma-separated: settings whose method is listed run")
    p.add_argument("--settings", default="", help="';'-separated setting names (overrides --methods)")
    p.add_argument("--cfgs", default="1,7", help="comma-separated CFG scales")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(SETTINGS))
        return
    chosen = ([s.strip() for s in args.settings.split(";") if s.strip()] if args.settings
              else [n for n, (m, _, _) in SETTINGS.items() if m in args.methods.split(",")])
    unknown = [n for n in chosen if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; --list prints them")
    cfgs = [float(c) for c in args.cfgs.split(",")]
    _setup_comfy()
    import comfy.sd
    import folder_paths
    import tiny_sd15
    from sampling import cat_to_dog, originals

    folder_paths.set_user_directory(tempfile.mkdtemp(prefix="ce_tradeoff_"))  # the encoding cache starts empty
    _import_pack()
    from concept_erasure_pack.erasure_core import make_config
    from concept_erasure_pack.erasure_core.methods.closed_form import preserve_list
    from concept_erasure_pack.nodes.closed_form_erase import OPTIONS, ClosedFormErase

    model, clip = comfy.sd.load_state_dict_guess_config(tiny_sd15.build_state_dict())[:2]
    widgets = {w.id: w.default for w in ClosedFormErase.define_schema().inputs if w.id in ("strength", *OPTIONS)}

    original = originals(model, clip, cfgs)
    print(f"torch {torch.__version__}; tiny_sd15 (CLIP-L 768, random weights); 8x8 latent, 2 Euler steps, seed 7")
    head = " | ".join(f"r, CFG {c:g} | worst drift, CFG {c:g}" for c in cfgs)
    print(f"| setting | {head} | median drift, CFG {cfgs[0]:g} | preserved prompts | s |")
    print("| --- |" + " ---: | ---: |" * len(cfgs) + " ---: | ---: | ---: |")
    for name in chosen:
        method, overrides, bank = SETTINGS[name]
        concepts = _concepts(bank)
        config = make_config(method, **(overrides | ({"preserve_bank": False} if bank is not None else {})))
        n_keep = len(preserve_list(concepts, preserve_empty=config.preserve_empty_prompt, bank=config.preserve_bank))
        started = time.perf_counter()
        with torch.inference_mode():
            out = ClosedFormErase.execute(model=model, clip=clip, concepts=concepts, method=method,
                                          options=config, **widgets)
        erased = out.result[0]
        cells, medians = [], []
        for c in cfgs:
            r, drift = cat_to_dog(erased, clip, original, c)
            drift = sorted(drift)
            cells += [f"{r:.3f}", f"{drift[-1]:.2f}"]
            medians.append(drift[len(drift) // 2])
        print(f"| {name} | {' | '.join(cells)} | {medians[0]:.2f} | {n_keep} | {time.perf_counter() - started:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
