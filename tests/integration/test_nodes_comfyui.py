"""The nodes inside a real ComfyUI (in-process, --cpu) on a tiny SD1.5-detected checkpoint."""

from __future__ import annotations

import pytest
import torch
from sampling import live_weight, loaded_state, sample

pytestmark = pytest.mark.comfyui

K_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _run(node_cls, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return node_cls.execute(**inputs).result


def _erase_output(pack, model, clip, targets, anchors="", preserve="", **options):
    """Closed-Form Erase's whole NodeOutput (result and ui) for these concepts."""
    from concept_erasure_pack.nodes.closed_form_erase import ClosedFormErase
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    (concepts,) = _run(LoadConcepts, targets=targets, anchors=anchors, preserve=preserve, kind="generic",
                       preset="none", file="none", templates="as given", custom_templates="")
    defaults = {"method": "uce", "strength": 1.0, "token_pick": "last word + EOT + padding",
                "erase_scale": 1.0, "preserve_scale": 0.1, "lamb": 0.5,
                "preserve_empty_prompt": True, "solve_dtype": "float64", "preserve_bank": False}
    with torch.inference_mode():
        return ClosedFormErase.execute(model=model, clip=clip, concepts=concepts, **(defaults | options))


def _erase(pack, model, clip, targets, anchors="", preserve="", **options):
    return _erase_output(pack, model, clip, targets, anchors, preserve, **options).result[:3]


MANY = "; ".join(f"Painter {c}" for c in "ABCDEFGHJKLM")  # 12 x 77-row keys: a full-rank (dense) edit


@pytest.mark.parametrize("targets", ["Van Gogh", MANY])
def test_input_model_is_bit_identical_after_erasing_and_sampling(pack, tiny_checkpoint, targets):
    model, clip, _ = tiny_checkpoint
    before = loaded_state(model)
    patches_before, uuid_before = dict(model.patches), model.patches_uuid
    erased, patch, report = _erase(pack, model, clip, targets, "a painter")
    sample(erased, clip, "Van Gogh", steps=1)
    sample(model, clip, "Van Gogh", steps=1)  # loads the original again: backups restored
    after = model.model_state_dict(filter_prefix="diffusion_model.")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.patches == patches_before and model.patches_uuid == uuid_before
    assert erased is not model and set(erased.patches) == set(patch.keys())
    assert "14 sites edited" in report


# 2 concepts x 77-row keys: a low-rank edit (LoRA adapters); 12 concepts: more key rows than the
# text width, so the edit has full rank and is applied as whole weight differences
@pytest.mark.parametrize("targets", ["Van Gogh; Monet", MANY])
def test_patched_clone_uses_the_cores_weights(pack, tiny_checkpoint, targets):
    from concept_erasure_pack.nodes import _comfy

    model, clip, _ = tiny_checkpoint
    _, sites = _comfy.attention_sites(model)
    erased, patch, _ = _erase(pack, model, clip, targets, "a painter")
    assert all(patch[s.key].is_low_rank for s in sites) == (targets == "Van Gogh; Monet")
    expected = {s.key: s.tensor() + patch[s.key].dense() for s in sites}
    for key in (sites[0].key, sites[-1].key):
        live = live_weight(erased, key)
        torch.testing.assert_close(live, expected[key], rtol=0, atol=2e-3 * expected[key].abs().max().item())
    live_weight(model, K_KEY)


def test_erasure_reads_the_model_as_it_arrives_with_an_upstream_lora(pack, tiny_checkpoint):
    from concept_erasure_pack.nodes import _comfy

    model, clip, _ = tiny_checkpoint
    lora = model.clone()
    delta = torch.randn(lora.model_state_dict()[K_KEY].shape, generator=torch.Generator().manual_seed(1)) * 0.01
    assert lora.add_patches({K_KEY: ("diff", (delta,))}, 1.0) == [K_KEY]
    _, base_sites = _comfy.attention_sites(model)
    _, lora_sites = _comfy.attention_sites(lora)
    base = {s.key: s.tensor() for s in base_sites}
    got = {s.key: s.tensor() for s in lora_sites}
    torch.testing.assert_close(got[K_KEY], base[K_KEY] + delta, rtol=0, atol=1e-6)
    erased, _, _ = _erase(pack, lora, clip, "Van Gogh", "a painter")
    after = erased.clone()
    after.add_patches({K_KEY: ("diff", (delta,))}, 0.5)
    kinds = [type(p[1]).__name__ for p in after.patches[K_KEY]]
    assert kinds == ["tuple", "LoRAAdapter", "tuple"]  # LoRA, erasure, LoRA: graph order
    assert len(lora.patches[K_KEY]) == 1  # the upstream clone is untouched


def _gap_ratio(pack, tiny_checkpoint, cfg, **options):
    model, clip, _ = tiny_checkpoint
    erased, _, _ = _erase(pack, model, clip, "cat", "dog", **options)
    orig_target, orig_anchor = sample(model, clip, "cat", cfg=cfg), sample(model, clip, "dog", cfg=cfg)
    erased_target = sample(erased, clip, "cat", cfg=cfg)
    gap = (orig_target - orig_anchor).norm()
    return ((erased_target - orig_anchor).norm() / gap).item(), erased, gap


def test_erased_target_samples_like_the_anchor_at_cfg_1(pack, tiny_checkpoint):
    ratio, _, _ = _gap_ratio(pack, tiny_checkpoint, cfg=1.0, preserve_empty_prompt=False)
    print(f"cfg 1: erased target is {ratio:.1%} of the target-anchor gap from the anchor")
    assert ratio < 0.10


def test_erased_target_samples_like_the_anchor_at_cfg_7_with_empty_prompt_preserved(pack, tiny_checkpoint):
    ratio, _, _ = _gap_ratio(pack, tiny_checkpoint, cfg=7.0, preserve_empty_prompt=True)
    print(f"cfg 7: erased target is {ratio:.1%} of the target-anchor gap from the anchor")
    assert ratio < 0.10


def test_preserved_prompt_barely_moves_when_preserved(pack, tiny_checkpoint):
    model, clip, _ = tiny_checkpoint
    gap = (sample(model, clip, "cat") - sample(model, clip, "dog")).norm()
    drift = {}
    for preserve in ("", "a red car"):
        erased, _, _ = _erase(pack, model, clip, "cat", "dog", preserve=preserve, preserve_scale=1.0)
        drift[preserve] = ((sample(erased, clip, "a red car") - sample(model, clip, "a red car")).norm() / gap).item()
    print(f"drift of 'a red car' as a share of the gap: not preserved {drift['']:.1%}, preserved {drift['a red car']:.1%}")
    assert drift["a red car"] < 0.5 * drift[""]


def test_strength_zero_gives_the_original_weights(pack, tiny_checkpoint):
    model, clip, _ = tiny_checkpoint
    erased, _, _ = _erase(pack, model, clip, "Van Gogh", "a painter", strength=0.0)
    original = live_weight(model, K_KEY)
    torch.testing.assert_close(live_weight(erased, K_KEY), original, rtol=0, atol=0)


def test_bad_inputs_name_the_node_and_input(pack):
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    rest = {"kind": "generic", "preset": "none", "file": "none", "templates": "as given", "custom_templates": ""}
    message = LoadConcepts.validate_inputs(targets="Van Gogh; Monet; Dali", anchors="a; b", preserve="", **rest)
    assert message.startswith("Load Concepts, input 'anchors':") and "(3), but got 2" in message
    message = LoadConcepts.validate_inputs(targets="x", anchors="", preserve="x", **rest)
    assert "input 'preserve'" in message and "'x' (target 'x')" in message
    message = LoadConcepts.validate_inputs(targets="Cat", anchors="cat", preserve="", **rest)
    assert "must differ from its anchor" in message


def test_a_patch_for_another_model_is_refused_before_anything_changes(pack, tiny_checkpoint):
    from concept_erasure_pack.erasure_core import PatchEntry, PatchError, PatchSet
    from concept_erasure_pack.nodes import _comfy

    model, _, _ = tiny_checkpoint
    patch = PatchSet({K_KEY: PatchEntry(diff=torch.zeros(320, 768)),
                      "diffusion_model.nope.weight": PatchEntry(diff=torch.zeros(4, 4))})
    uuid = model.patches_uuid
    with pytest.raises(PatchError, match="1 of 2 keys"):
        _comfy.apply_patchset(model, patch, 1.0)
    assert model.patches_uuid == uuid and K_KEY not in model.patches


def test_unsupported_architecture_is_refused_by_name(pack):
    from concept_erasure_pack.erasure_core import ArchitectureError, detect

    with pytest.raises(ArchitectureError, match="HunyuanVideo models are not supported: its text enters through "
                                                "a token refiner") as err:
        detect({"diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.weight": (3072,),
                "diffusion_model.txt_in.input_embedder.weight": (3072, 4096)})
    assert "Supported families: Stable Diffusion 1.x" in str(err.value) and "Flux" in str(err.value)


@pytest.mark.parametrize("method", ["uce", "speed", "rece", "mace", "realera"])
def test_every_method_patches_a_clone_and_leaves_the_input_untouched(pack, tiny_checkpoint, method):
    from concept_erasure_pack.erasure_core import make_config

    model, clip, _ = tiny_checkpoint
    before = loaded_state(model)
    options = make_config(method) if method in ("speed", "rece") else None
    erased, patch, report = _erase(pack, model, clip, "Van Gogh; Monet", "a painter", "Rembrandt",
                                   method=method, options=options)
    assert erased is not model and set(erased.patches) == set(patch.keys()) and patch.meta["method"] == method
    sample(erased, clip, "Van Gogh", steps=1)
    sample(model, clip, "Van Gogh", steps=1)
    after = loaded_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.patches
    assert method.upper() in report


def test_a_second_erase_reuses_the_cached_encodings(pack, tiny_checkpoint):
    from concept_erasure_pack.nodes import _comfy

    model, clip, _ = tiny_checkpoint
    preserve = "Rembrandt; Johannes Vermeer; a photo of a cat; a red car"
    _, _, first = _erase(pack, model, clip, "Salvador Dali", "a painter", preserve)
    _, _, second = _erase(pack, model, clip, "Salvador Dali", "a painter", preserve)
    from concept_erasure_pack.erasure_core import ConceptSet
    from concept_erasure_pack.erasure_core.methods.closed_form import preserve_list

    concepts = ConceptSet.simple(("Salvador Dali",), ("a painter",), [p.strip() for p in preserve.split(";")])
    prompts = 2 + len(preserve_list(concepts, preserve_empty=True, bank=False))  # _erase pins the bank off
    assert "prompts encoded" in first and f"0 prompts encoded, {prompts} from cache" in second
    lora_clip = clip.clone()
    key = next(k for k in lora_clip.patcher.model_state_dict() if k.endswith("self_attn.q_proj.weight"))
    lora_clip.add_patches({key: ("diff", (torch.zeros(lora_clip.patcher.model_state_dict()[key].shape),))}, 1.0)
    assert _comfy.clip_fingerprint(lora_clip) != _comfy.clip_fingerprint(clip)


def test_the_report_breaks_the_time_down_and_a_known_preserve_bank_is_not_encoded_again(pack, tiny_checkpoint):
    from concept_erasure_pack.nodes.closed_form_erase import ClosedFormErase
    from concept_erasure_pack.nodes.load_concepts import LoadConcepts

    model, clip, _ = tiny_checkpoint
    preserve = "Caravaggio; Titian; a photo of a horse"
    counts = []
    for targets in ("Egon Schiele", "Gustav Klimt"):  # 6 prompts each: target, anchor, 3 preserved, ""
        (concepts,) = _run(LoadConcepts, targets=targets, anchors="a sculptor", preserve=preserve, kind="generic",
                           preset="none", file="none", templates="as given", custom_templates="")
        with torch.inference_mode():
            out = ClosedFormErase.execute(model=model, clip=clip, concepts=concepts, method="uce", strength=1.0,
                                          token_pick="last subject token", erase_scale=1.0, preserve_scale=0.1,
                                          lamb=0.5, preserve_empty_prompt=True, solve_dtype="float64",
                                          preserve_bank=False)
        report, lines = out.result[2], out.ui["ce_report"][0]["lines"]
        assert all(f"{part} " in report for part in ("encode", "weights", "solve", "patch"))
        encoded, cached = (int(n) for n in report.split(" prompts encoded, ")[0].rsplit(" ", 1)[1:]
                           + [report.split(" prompts encoded, ")[1].split()[0]])
        assert encoded + cached == 6
        assert f"({cached / 6:.0%} hit rate)" in report
        assert lines[2] == f"prompts: {encoded} encoded, {cached} from cache ({cached / 6:.0%} hit rate)"
        counts.append((encoded, cached))
    assert counts[1] == (1, 5)  # the second erase encodes only its new target


def test_check_off_skips_the_measurement_and_leaves_the_edit_unchanged(pack, tiny_checkpoint, monkeypatch):
    import concept_erasure_pack.nodes.closed_form_erase as node

    model, clip, _ = tiny_checkpoint
    _, on, report_on = _erase(pack, model, clip, "Van Gogh", "a painter")
    monkeypatch.setattr(node, "check_edit", lambda *a, **k: pytest.fail("the check ran although it is off"))
    out = _erase_output(pack, model, clip, "Van Gogh", "a painter", check=False)
    _, off, report_off, image = out.result
    assert "gap left on targets" in report_on and "gap left" not in report_off and node.CHECK_OFF in report_off
    assert out.ui["ce_report"][0]["bars"] == [] and node.CHECK_OFF in out.ui["ce_report"][0]["lines"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    for key in on.keys():
        assert torch.equal(on[key].dense(), off[key].dense())
