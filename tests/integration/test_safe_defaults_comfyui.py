"""Issue #13 in a real ComfyUI: with the shipped defaults, every method erases the exact target
and we measure how far prompts in no list move, at CFG 1 and 7 (latent space, same seed).

Checkpoint: ``tiny_sd15`` (loaded by ComfyUI's own loader). Its text encoder is a full-size CLIP-L
(12 layers, width 768: the key space every edit lives in, exactly as in SD1.5) with seeded random
weights, and its UNet keeps SD1.5's cross-attention widths (320, 640) with fewer blocks (7 attention
layers instead of 16), so the ~70 two-step samples this file takes stay affordable on a 2-core CPU.
A random CLIP is the hard case for drift: the rows of unrelated prompts are far more alike than a
trained CLIP's (cosine ~0.85 between the padding rows of "cat" and "a red car on a street").

    r     = mean |latent(erased, "cat") − latent(original, "dog")| / mean |latent(original, "cat") − latent(original, "dog")|
    drift = mean |latent(erased, p) − latent(original, p)| / mean |latent(original, "a photo of a cat") − ... "a photo of a dog"|
"""

from __future__ import annotations

import pytest
import torch
from sampling import UNRELATED, cat_to_dog, originals

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

METHODS = ("uce", "speed", "rece", "mace", "realera")
CFGS = (1.0, 7.0)
# What each method reaches at its defaults on this checkpoint (measured; README "Safe by default").
# (r bound, drift bound): r is the bound; drift is what the defaults reach, not yet 0.10.
REACHED = {"uce": (0.1, 0.34),
           "speed": (0.1, 0.53),
           "rece": (0.1, 0.64),
           "mace": (0.1, 0.50),
           "realera": (0.1, 0.42)}


@pytest.fixture(scope="module")
def measured(pack, tiny_checkpoint):
    from concept_erasure_pack.nodes.closed_form_erase import OPTIONS, ClosedFormErase
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    model, clip, _ = tiny_checkpoint
    widgets = {w.id: w.default for w in ClosedFormErase.define_schema().inputs if w.id in ("strength", *OPTIONS)}
    with torch.inference_mode():
        (concepts,) = LoadConcepts.execute(targets="cat", anchors="dog", preserve="", kind="generic", preset="none",
                                           file="none", templates="as given", custom_templates="").result

    original = originals(model, clip, CFGS)
    out = {}

    def measure(method):
        """(r, drift per unrelated prompt) per CFG for one method, sampled on first use only (a method
        whose bounds are not recorded skips before it costs ~14 samples)."""
        if (method, CFGS[0]) not in out:
            with torch.inference_mode():
                erased = ClosedFormErase.execute(model=model, clip=clip, concepts=concepts, method=method,
                                                 **widgets).result[0]
            for cfg in CFGS:
                r, drift = cat_to_dog(erased, clip, original, cfg)
                out[method, cfg] = (r, drift)
                print(f"{method} cfg {cfg:g}: r {r:.3f}, drift {' '.join(f'{d:.3f}' for d in drift)}")
        return out

    return measure


def test_the_unrelated_prompts_are_in_no_list(pack):
    """What the drift bounds rest on: no UNRELATED prompt is preserved, in the bank or a probe."""
    from concept_erasure_pack.erasure_core.methods.bank import probe_prompts
    from concept_erasure_pack.erasure_core.methods.closed_form import preserve_list
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    with torch.inference_mode():
        (concepts,) = LoadConcepts.execute(targets="cat", anchors="dog", preserve="", kind="generic", preset="none",
                                           file="none", templates="as given", custom_templates="").result
    keep = preserve_list(concepts, preserve_empty=True, bank=True)
    assert not set(UNRELATED) & {*keep, *probe_prompts(concepts, keep)}


def _bounds(method):
    if REACHED.get(method) is None:
        pytest.skip(f"{method}: bounds not measured yet (the measuring run did not reach it in time); "
                    "run this file with -s and record what it prints in REACHED")
    return REACHED[method]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("method", METHODS)
def test_defaults_erase_the_exact_target(measured, method, cfg):
    r_bound, _ = _bounds(method)
    r, _ = measured(method)[method, cfg]
    assert r <= r_bound


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("method", METHODS)
def test_defaults_keep_five_unrelated_prompts_within_what_they_reach(measured, method, cfg):
    _, drift_bound = _bounds(method)
    _, drift = measured(method)[method, cfg]
    assert len(drift) >= 5 and max(drift) <= drift_bound
