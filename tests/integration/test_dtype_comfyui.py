"""Erasure strength does not depend on the model's weight dtype (issue #14): the same UCE erasure
of "cat" into "dog" on the tiny SD1.5 checkpoint loaded by ComfyUI as fp16, bf16 and fp8 (e4m3fn).

Below float32 the anchored closed-form edit is applied as a float32 transform of the
cross-attention context (``W₀ (M c)`` = ``(W₀ M) c``) instead of being rounded into the stored
weights, where a small delta is lost (bf16 keeps 8 bits, fp8 4).
"""

from __future__ import annotations

import pytest
import torch
from sampling import sample

pytestmark = pytest.mark.comfyui

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}


def _run(node_cls, **inputs):
    with torch.inference_mode():
        return node_cls.execute(**inputs).result


def _load(tiny_state_dict, dtype):
    import comfy.sd

    return comfy.sd.load_state_dict_guess_config(dict(tiny_state_dict), model_options={"dtype": dtype})[:2]


def _erase(model, clip, targets="cat", anchors="dog"):
    from concept_erasure_pack.nodes.closed_form_erase import ClosedFormErase
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    (concepts,) = _run(LoadConcepts, targets=targets, anchors=anchors, preserve="", kind="generic", preset="none",
                       file="none", templates="as given", custom_templates="")
    return _run(ClosedFormErase, model=model, clip=clip, concepts=concepts, method="uce", strength=1.0,
                token_pick="last word + EOT + padding", erase_scale=1.0, preserve_scale=0.1, lamb=0.5,
                preserve_empty_prompt=False, solve_dtype="float64", preserve_bank=False)[:3]


@pytest.mark.parametrize("name", list(DTYPES))
def test_the_erased_target_lands_on_the_anchor_in_every_weight_dtype(pack, tiny_state_dict, name):
    model, clip = _load(tiny_state_dict, DTYPES[name])
    assert model.model_state_dict()[
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].dtype == DTYPES[name]
    erased, _, _ = _erase(model, clip)
    target, anchor = sample(model, clip, "cat"), sample(model, clip, "dog")
    ratio = ((sample(erased, clip, "cat") - anchor).norm() / (target - anchor).norm()).item()
    print(f"{name}: erased 'cat' is {ratio:.3f} of the cat-dog gap from 'dog'")
    assert ratio < 0.10
    assert not erased.patches, "below float32 the edit must not be rounded into the weights"


def test_the_transform_reads_back_as_the_edited_weight_and_stacks_with_a_second_erasure(pack, tiny_state_dict):
    from concept_erasure_pack.nodes import _comfy

    model, clip = _load(tiny_state_dict, torch.bfloat16)
    erased, patch, _ = _erase(model, clip)
    _, base = _comfy.attention_sites(model)
    _, after = _comfy.attention_sites(erased)
    for b, a in zip(base, after, strict=True):
        torch.testing.assert_close(a.tensor(), b.tensor() + patch[b.key].dense(), rtol=0, atol=1e-4)
    twice, patch2, _ = _erase(erased, clip, "a red car", "a car")
    _, again = _comfy.attention_sites(twice)
    for a, t in zip(after, again, strict=True):
        torch.testing.assert_close(t.tensor(), a.tensor() + patch2[a.key].dense(), rtol=0, atol=1e-4)
    assert model.model_options["transformer_options"].get("patches", {}).get("attn2_patch", []) == []
    assert len(twice.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1  # composed, not stacked


def test_a_full_rank_edit_applied_as_a_transform_takes_no_per_weight_product(pack, tiny_state_dict):
    # twelve targets' rows (~74 each) outnumber CLIP-L's width (768): M − I has full rank. Applied as a context
    # transform (bf16 weights) and checked from the shared multiplier, the node never forms W₀ (M − I);
    # reading an entry (Save Erasure does) takes it, and it is the edit the transform applies
    from concept_erasure_pack.nodes import _comfy

    model, clip = _load(tiny_state_dict, torch.bfloat16)
    targets = ("cat; a red car; a tall tree; a river; a castle; a violin; a lighthouse; a bicycle; a mountain; "
               "a teapot; a robot; a sailboat")
    erased, patch, report = _erase(model, clip, targets)
    assert all(q is None for _, q in patch.context_multipliers.values())
    assert all(e.is_deferred for e in patch.entries.values()) and not erased.patches
    assert "gap left on targets (12)" in report
    _, base = _comfy.attention_sites(model)
    _, after = _comfy.attention_sites(erased)
    for b, a in zip(base, after, strict=True):
        torch.testing.assert_close(a.tensor(), b.tensor() + patch[b.key].dense(), rtol=0, atol=1e-4)
