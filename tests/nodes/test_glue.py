"""The nodes and their ComfyUI glue on a FakePatcher and a FakeClip: stubbed ComfyUI always, the
real comfy.lora / model_management / utils as well when COMFYUI_PATH is set."""

from __future__ import annotations

import pytest
import torch
from comfy_stubs import FakeClip, FakePatcher, flux_weights, sd1_site_keys, sd1_weights, site_key

K_KEY = site_key("input_blocks.1.1", "k")
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 sums of O(1) weights and small deltas


def _concepts(env, targets="Van Gogh", anchors="a painter", preserve="Monet"):
    node = env.pack.nodes.load_concepts.LoadConcepts
    (concepts,) = node.execute(targets=targets, anchors=anchors, preserve=preserve).result
    return concepts


def _widget_defaults(env):
    """The option values the UI sends when the user leaves every widget at its default."""
    node = env.pack.nodes.closed_form_erase
    return {w.id: w.default for w in node.ClosedFormErase.define_schema().inputs if w.id in node.OPTIONS}


def _erase(env, model, clip=None, strength=1.0, **concept_text):
    node = env.pack.nodes.closed_form_erase.ClosedFormErase
    out = node.execute(model=model, clip=clip or FakeClip(), concepts=_concepts(env, **concept_text),
                       method="uce", strength=strength, **_widget_defaults(env))
    return out.result[:3]  # model, patch, report (the check chart is tested on its own)


def _live_weight(env, model, key):
    """The weight ``model`` would compute with: its base weight, then its patches, via comfy.lora."""
    return env.calculate_weight(model.patches.get(key, []), model.weights[key].float().clone(), key)


def _with_upstream_lora(model, key=K_KEY, seed=1):
    """A clone of ``model`` with a seeded ``diff`` patch on ``key`` (as a LoRA loader would add)."""
    lora = model.clone()
    delta = torch.randn(model.weights[key].shape, generator=torch.Generator().manual_seed(seed)) * 0.01
    assert lora.add_patches({key: ("diff", (delta,))}, 1.0) == [key]
    return lora, delta


@pytest.fixture
def model():
    return FakePatcher(sd1_weights())


# -- Closed-Form Erase on a model -------------------------------------------------------------


def test_erase_returns_a_new_model(env, model):
    erased, _, _ = _erase(env, model)
    assert isinstance(erased, FakePatcher) and erased is not model


def test_erase_leaves_the_input_models_patches_and_weights_unchanged(env, model):
    lora, _ = _with_upstream_lora(model)
    patches = {k: list(v) for k, v in lora.patches.items()}
    weights = {k: v.clone() for k, v in lora.weights.items()}
    _erase(env, lora)
    assert lora.patches == patches
    assert all(torch.equal(lora.weights[k], weights[k]) for k in weights)


def test_erase_adds_one_patch_to_every_kv_site_and_nothing_else(env, model):
    erased, patch, _ = _erase(env, model)
    assert {k: len(v) for k, v in erased.patches.items()} == dict.fromkeys(sd1_site_keys(), 1)
    assert sorted(patch.keys()) == sd1_site_keys()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_patched_weight_is_the_site_weight_plus_strength_times_the_patch(env, model, strength):
    erased, patch, _ = _erase(env, model, strength=strength)
    for key in sd1_site_keys():
        expected = model.weights[key] + strength * patch[key].dense()
        torch.testing.assert_close(_live_weight(env, erased, key), expected, **TOL)


def test_erase_changes_the_site_weights(env, model):
    _, patch, _ = _erase(env, model)
    assert min(patch[k].dense().abs().max().item() for k in sd1_site_keys()) > 1e-4


def test_report_counts_the_sites_edited(env, model):
    _, _, report = _erase(env, model)
    assert f"{len(sd1_site_keys())} sites edited" in report


def test_sites_are_read_with_the_models_upstream_patches_applied(env, model):
    lora, delta = _with_upstream_lora(model)
    _, sites = env.pack.nodes._comfy.attention_sites(lora)
    weight = next(s for s in sites if s.key == K_KEY).tensor()
    torch.testing.assert_close(weight, model.weights[K_KEY] + delta, **TOL)


def test_erasure_patch_follows_the_upstream_patches(env, model):
    lora, delta = _with_upstream_lora(model)
    erased, patch, _ = _erase(env, lora)
    expected = model.weights[K_KEY] + delta + patch[K_KEY].dense()
    torch.testing.assert_close(_live_weight(env, erased, K_KEY), expected, **TOL)


# -- apply_patchset ---------------------------------------------------------------------------


def test_apply_patchset_adds_a_dense_entry_as_a_diff(env, model):
    core = env.core
    diff = torch.randn(model.weights[K_KEY].shape, generator=torch.Generator().manual_seed(2))
    patched = env.pack.nodes._comfy.apply_patchset(model, core.PatchSet({K_KEY: core.PatchEntry(diff=diff)}), 0.25)
    torch.testing.assert_close(_live_weight(env, patched, K_KEY), model.weights[K_KEY] + 0.25 * diff, **TOL)


def test_apply_patchset_refuses_unknown_keys_and_leaves_the_input_untouched(env, model):
    core = env.core
    patch = core.PatchSet({K_KEY: core.PatchEntry(diff=torch.zeros(model.weights[K_KEY].shape)),
                           "diffusion_model.nope.weight": core.PatchEntry(diff=torch.zeros(4, 4))})
    with pytest.raises(core.PatchError, match="1 of 2 keys"):
        env.pack.nodes._comfy.apply_patchset(model, patch, 1.0)
    assert model.patches == {}


# -- ComfyClipEncoder --------------------------------------------------------------------------

PROMPTS = [f"concept number {i} in style {i % 7}" for i in range(70)]


def test_encoder_batches_give_the_same_states_as_one_prompt_at_a_time(env):
    encoder = env.pack.nodes._comfy.ComfyClipEncoder
    batched = encoder(FakeClip(), batch_size=32)(PROMPTS)
    single = encoder(FakeClip(), batch_size=1)(PROMPTS)
    torch.testing.assert_close(batched.hidden, single.hidden, rtol=1e-6, atol=1e-6)
    assert torch.equal(batched.eot_index, single.eot_index)


def test_encoder_sends_prompts_in_batches_of_batch_size(env):
    clip = FakeClip()
    env.pack.nodes._comfy.ComfyClipEncoder(clip, batch_size=32)(PROMPTS)
    assert clip.encoded_windows == [32, 32, 6]


def test_encoder_finds_the_end_of_text_after_the_last_word(env):
    enc = env.pack.nodes._comfy.ComfyClipEncoder(FakeClip())(["", "Van Gogh", "a red car"])
    assert enc.eot_index.tolist() == [1, 3, 4]


def test_encoder_refuses_a_concept_longer_than_one_window(env):
    encoder = env.pack.nodes._comfy.ComfyClipEncoder(FakeClip())
    with pytest.raises(env.core.ConceptError, match="needs 2"):
        encoder([" ".join(["word"] * 80)])


# -- errors name the node ------------------------------------------------------------------------


def test_an_unsupported_model_is_refused_naming_the_node_and_input(env):
    with pytest.raises(env.core.ArchitectureError) as info:
        _erase(env, FakePatcher(flux_weights()))
    assert str(info.value).startswith("Closed-Form Erase, input 'model':")


def test_load_concepts_errors_name_the_node_and_input(env):
    node = env.pack.nodes.load_concepts.LoadConcepts
    with pytest.raises(env.core.ConceptError) as info:
        node.execute(targets=" ; ", anchors="", preserve="")
    assert str(info.value).startswith("Load Concepts, input 'targets':")


def test_validate_inputs_accepts_good_concepts(env):
    node = env.pack.nodes.load_concepts.LoadConcepts
    assert node.validate_inputs(targets="Van Gogh; Monet", anchors="a painter", preserve="Dali") is True


@pytest.mark.parametrize(("targets", "anchors", "input_name"), [
    ("Van Gogh; Monet; Dali", "a; b", "anchors"),  # neither one anchor nor one per target
    (" ; ", "", "targets"),  # no targets
    ("Cat", "cat", "anchors"),  # a target equal to its anchor
])
def test_validate_inputs_names_the_node_and_the_bad_input(env, targets, anchors, input_name):
    node = env.pack.nodes.load_concepts.LoadConcepts
    message = node.validate_inputs(targets=targets, anchors=anchors, preserve="")
    assert message.startswith(f"Load Concepts, input '{input_name}':")


@pytest.mark.parametrize("linked", ["targets", "anchors", "preserve"])
def test_validate_inputs_defers_a_linked_input_to_run_time(env, linked):
    node = env.pack.nodes.load_concepts.LoadConcepts
    inputs = {"targets": "Cat", "anchors": "cat", "preserve": ""} | {linked: None}
    assert node.validate_inputs(**inputs) is True


# -- progress and Cancel (stub only: they drive ComfyUI's global state) -------------------------


def test_cancel_stops_the_erasure_and_leaves_the_input_untouched(stub_env, model):
    mm = stub_env.comfy["comfy.model_management"]
    weights = {k: v.clone() for k, v in model.weights.items()}
    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        _erase(stub_env, model)
    assert model.patches == {}
    assert all(torch.equal(model.weights[k], weights[k]) for k in weights)


def test_progress_bar_reports_encoding_then_every_site(stub_env, model):
    _erase(stub_env, model)
    (bar,) = stub_env.comfy["comfy.utils"].bars
    n = len(sd1_site_keys())
    core = stub_env.pack.erasure_core
    concepts = core.ConceptSet.simple(("Van Gogh",), ("a painter",), ("Monet",))
    keep = core.methods.closed_form.preserve_list(concepts, preserve_empty=True, bank=True)
    probes = core.methods.bank.probe_prompts(concepts, keep)
    # "Van Gogh", "a painter", "Monet", the empty prompt and the bank, encoded in one call; every
    # site; then the check encodes its held-out probes (the other prompts come from the cache).
    encoded = 2 + len(keep)  # in batches of 32
    batches = [(min(i + 32, encoded), encoded) for i in range(0, encoded, 32)]
    assert bar.updates == [*batches, *((i, n) for i in range(1, n + 1)), (len(probes), len(probes))]


def test_load_concepts_blames_a_too_long_preserve_concept_on_preserve(env):
    with pytest.raises(env.core.ConceptError) as info:
        _concepts(env, preserve=" ".join(["word"] * 80))
    assert str(info.value).startswith("Load Concepts, input 'preserve':") and "80 tokens" in str(info.value)


def test_erase_blames_a_too_long_concept_from_elsewhere_on_the_concepts_input(env, model):
    concepts = env.core.ConceptSet.simple(("Van Gogh",), ("a painter",), (" ".join(["word"] * 80),))
    node = env.pack.nodes.closed_form_erase.ClosedFormErase
    with pytest.raises(env.core.ConceptError) as info:
        node.execute(model=model, clip=FakeClip(), concepts=concepts, method="uce", strength=1.0,
                     **_widget_defaults(env))
    assert str(info.value).startswith("Closed-Form Erase, input 'concepts':")


def test_erase_outputs_the_check_as_numbers_bars_and_an_image_last(env, model):
    node = env.pack.nodes.closed_form_erase.ClosedFormErase
    out = node.execute(model=model, clip=FakeClip(), concepts=_concepts(env), method="uce", strength=1.0,
                       **_widget_defaults(env))
    _, _, report, chart = out.result
    assert "gap left on targets" in report and "drift of held-out probes" in report
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0 and float(chart.std()) > 0
    payload = out.ui[env.pack.nodes._report.UI_KEY][0]
    labels = [bar["label"] for bar in payload["bars"]]
    assert labels[0].startswith("gap left: ") and any(lab.startswith("probe drift") for lab in labels)
    assert all(bar["value"] is not None for bar in payload["bars"])
    assert [o.display_name for o in node.define_schema().outputs] == ["model", "patch", "report", "check"]
