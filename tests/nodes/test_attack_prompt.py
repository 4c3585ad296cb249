"""Attack Prompt on a FakePatcher and a FakeClip: stubbed ComfyUI always, the real comfy modules too
when COMFYUI_PATH is set. soft_prompt needs a real UNet and CLIP: tests/integration covers it."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from comfy_stubs import FakeClip, FakePatcher, sd1_weights

WORDS = ("starry night sunflowers painting swirling brush oil canvas blue yellow village church cypress "
         "portrait landscape wheat field stars moon sky dark bright colour thick paint style artist").split()


class AttackClip(FakeClip):
    """FakeClip with pooled outputs and a readable vocabulary (``tokenizer.clip_l.inv_vocab``)."""

    def __init__(self):
        super().__init__()
        self.tokenizer = SimpleNamespace(clip_l=SimpleNamespace(
            inv_vocab={self._word_id(w): w + "</w>" for w in WORDS}))

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond = super().encode_from_tokens(tokens)
        if return_dict:  # as ComfyUI's CLIP: the conditioning and its extras in one dict
            return {"cond": cond, "pooled_output": cond[:, -1].clone()}
        return (cond, cond[:, -1].clone()) if return_pooled else cond


def _defaults(env):
    node = env.pack.nodes.attack_prompt.AttackPrompt
    return {w.id: w.default for w in node.define_schema().inputs
            if w.id not in ("model", "clip", "original_model", "latent")}


def _erase(env, model, clip):
    from test_glue import _erase as erase_with_defaults

    erased, _, _ = erase_with_defaults(env, model, clip, targets="van gogh", anchors="a painter", preserve="")
    return erased


def _attack(env, model, clip, **inputs):
    node = env.pack.nodes.attack_prompt.AttackPrompt
    values = _defaults(env) | {"concept": "van gogh"} | inputs
    with torch.inference_mode():
        return node.execute(model=model, clip=clip, **values)


@pytest.fixture
def models():
    clip = AttackClip()
    original = FakePatcher(sd1_weights())
    return original, clip


def test_closed_form_recovers_a_uce_erasure(env, models):
    original, clip = models
    erased = _erase(env, original, clip)
    patches = {k: list(v) for k, v in erased.patches.items()}
    out = _attack(env, erased, clip, mode="closed_form", reg=1e-6, original_model=original)
    cond, prompt, recovery, noise, report = out.result
    assert cond[0][0].shape == (1, 77, 768) and "pooled_output" in cond[0][1]
    assert prompt == "" and math.isnan(noise)
    assert recovery == pytest.approx(1.0, abs=1e-3)
    assert "closed_form on Stable Diffusion 1.x" in report
    assert "the prompt output is empty" in report and out.ui["text"] == [report]
    (bar,) = out.ui["ce_report"][0]["bars"]  # recovery, drawn on the node: high is bad for the erasure
    assert bar["label"] == "K/V recovery" and bar["value"] == pytest.approx(recovery) and bar["good"] == "low"
    assert erased.patches == patches and not original.patches  # inputs untouched


def test_concept_vector_is_carrier_plus_strength_times_the_mean_difference(env, models):
    original, clip = models
    pairs = "a painting by van gogh | a painting\nvan gogh sunflowers | sunflowers"
    out = _attack(env, original, clip, mode="concept_vector", carrier="a village church", pairs=pairs,
                  strength=2.5)
    cond, prompt, recovery, _, report = out.result

    def enc(text):
        return clip.encode_from_tokens(clip.tokenize(text))[0]

    direction = ((enc("a painting by van gogh") - enc("a painting")) + (enc("van gogh sunflowers")
                                                                       - enc("sunflowers"))) / 2
    torch.testing.assert_close(cond[0][0][0], enc("a village church") + 2.5 * direction, rtol=1e-5, atol=1e-5)
    assert prompt == "" and math.isnan(recovery) and "original_model" in report


def test_concept_vector_search_is_readable_and_deterministic(env, models):
    original, clip = models
    erased = _erase(env, original, clip)
    runs = [_attack(env, erased, clip, mode="concept_vector", search_steps=6, search_tokens=4,
                    search_population=8, random_seed=seed, original_model=original).result for seed in (1, 1, 2)]
    (cond, prompt, recovery, _, report), again, _ = runs
    assert prompt and all(w in WORDS for w in prompt.split()) and len(prompt.split()) == 4
    assert prompt == again[1] and torch.equal(cond[0][0], again[0][0][0]) and recovery == again[2]
    torch.testing.assert_close(cond[0][0], clip.encode_from_tokens(clip.tokenize(prompt)))
    assert "token search: 6 generations" in report and not math.isnan(recovery)


def test_identical_models_are_reported(env, models):
    original, clip = models
    out = _attack(env, original, clip, mode="closed_form", original_model=original.clone())
    assert out.result[2] == 1.0 and "trivially 1" in out.result[4] and "K/V weights are identical" in out.result[4]


def _error(env, models, match, **inputs):
    original, clip = models
    with pytest.raises(env.core.ErasureError, match=match) as info:
        _attack(env, original, clip, **inputs)
    assert str(info.value).startswith("Attack Prompt")
    return info.value


def test_bad_inputs_are_refused_clearly(env, models, tmp_path):
    original, _ = models
    assert _error(env, models, "empty", concept="  ").input_name == "concept"
    assert _error(env, models, "original_model is not connected", mode="closed_form").input_name == "original_model"
    assert _error(env, models, "between 0.0 and 20.0", strength=50.0).input_name == "strength"
    assert _error(env, models, "between 1 and 1000", mode="soft_prompt", steps=0,
                  original_model=original).input_name == "steps"
    assert _error(env, models, "plain file name", mode="soft_prompt", save_embedding="../evil",
                  original_model=original).input_name == "save_embedding"
    assert _error(env, models, "line 1", pairs="no separator here").input_name == "pairs"


def test_an_existing_embedding_is_not_overwritten_before_any_work(env, models):
    original, _ = models
    from_pack = env.pack.nodes._comfy
    path = from_pack.embedding_path("taken", overwrite=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"keep")
    _error(env, models, "exists", mode="soft_prompt", save_embedding="taken", original_model=original)
    assert open(path, "rb").read() == b"keep"
    os.remove(path)


def test_a_different_architecture_is_refused(env, models):
    original, clip = models
    gen = torch.Generator().manual_seed(0)
    sd2 = {"diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=gen)}
    for proj in ("k", "v"):
        sd2[f"diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_{proj}.weight"] = torch.randn(
            16, 1024, generator=gen)
    err = _error(env, models, "same architecture", mode="closed_form", original_model=FakePatcher(sd2))
    assert err.input_name == "original_model"



def test_widgets_take_default_range_and_help_from_the_core_config(env):
    import dataclasses
    from enum import Enum

    node = env.pack.nodes.attack_prompt
    widgets = {w.id: w for w in node.AttackPrompt.define_schema().inputs}
    for field in dataclasses.fields(env.pack.erasure_core.attacks.config.AttackConfig):
        widget, default = widgets[field.name], field.default
        assert widget.default == (default.value if isinstance(default, Enum) else default)
        assert widget.tooltip == field.metadata["help"]
        if not isinstance(default, Enum):
            assert (widget.min, widget.max) == (field.metadata["min"], field.metadata["max"])


def test_search_shows_progress_and_cancel_stops_it(stub_env, models):
    original, clip = models
    _attack(stub_env, original, clip, mode="concept_vector", search_steps=3, search_tokens=2, search_population=4)
    (bar,) = stub_env.comfy["comfy.utils"].bars  # the encodings (concept vs empty, carrier), then the search
    assert bar.updates == [(0, 3), (1, 3), (2, 3), (3, 3), (1, 3), (2, 3), (3, 3)]
    mm = stub_env.comfy["comfy.model_management"]
    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        _attack(stub_env, original, clip, mode="concept_vector", search_steps=3, search_tokens=2,
                search_population=4)


def test_decoded_prompts_escape_weight_syntax(env, models):
    _, clip = models
    space = env.pack.nodes._comfy.ClipTokenSpace(clip)
    space.inv_vocab = {1: "(</w>", 2: "starry</w>", 3: ":</w>", 4: "2</w>", 5: ")</w>"}
    assert space.decode([1, 2, 3, 4, 5]) == "\\( starry : 2 \\)"
    assert 49406 not in space.vocabulary.tolist() and 49407 not in space.vocabulary.tolist()


class CountingClip(AttackClip):
    def __init__(self):
        super().__init__()
        self.encodes = 0

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.encodes += 1
        return super().encode_from_tokens(tokens, return_pooled, return_dict)


def test_pairs_are_limited_in_size_and_count_before_any_encoding(env, models):
    original, _ = models
    clip = CountingClip()
    limit = env.pack.erasure_core.attacks.config.MAX_PAIRS
    for pairs, match in (("a painting by van gogh | a painting\n" * (limit + 1), f"at most {limit} pairs, but got "
                                                                                  f"{limit + 1}"),
                         ("van gogh | x\n" * 5000, "at most 50,000 characters, but got 65,000")):
        with pytest.raises(env.core.ConceptError, match=match) as info:
            _attack(env, original, clip, mode="concept_vector", pairs=pairs)
        assert info.value.input_name == "pairs" and "Attack Prompt" in str(info.value)
    assert clip.encodes == 0
    many = "".join(f"van gogh {i} | a painting {i}\n" for i in range(limit))  # the limit itself is accepted
    out = _attack(env, original, clip, mode="concept_vector", pairs=many)
    assert f"from {limit} pair(s)" in out.result[4] and clip.encodes == 2 * limit + 2
    for name in ("concept", "carrier"):
        with pytest.raises(env.core.ConceptError, match="at most 50,000 characters") as info:
            _attack(env, original, clip, **{name: "van gogh " * 6000})
        assert info.value.input_name == name


def test_a_bad_pairs_line_is_quoted_short(env, models):
    err = _error(env, models, "line 2", pairs="a | b\n" + "no separator " * 2_000)
    assert len(str(err)) < 300 and "...'" in str(err)


def test_pair_encoding_shows_progress_and_cancel_stops_it(stub_env, models):
    original, clip = models
    pairs = "van gogh sunflowers | sunflowers\nstarry night by van gogh | starry night"
    _attack(stub_env, original, clip, mode="concept_vector", pairs=pairs)
    (bar,) = stub_env.comfy["comfy.utils"].bars
    assert bar.updates == [(i, 5) for i in range(6)]  # 2 pairs x 2 prompts + the carrier
    mm = stub_env.comfy["comfy.model_management"]
    mm.interrupt_processing = True
    counting = CountingClip()
    with pytest.raises(mm.InterruptProcessingException):
        _attack(stub_env, original, counting, mode="concept_vector", pairs=pairs)
    assert counting.encodes == 1  # the concept only: no pair was encoded after Cancel


def test_queue_time_checks_the_typed_texts_cheaply(env):
    node = env.pack.nodes.attack_prompt.AttackPrompt
    limit = env.pack.erasure_core.attacks.config.MAX_PAIRS
    too_many = "a | b\n" * (limit + 1)
    assert node.validate_inputs(mode="concept_vector", pairs="a painting by van gogh | a painting") is True
    assert node.validate_inputs(mode="closed_form", pairs=too_many) is True  # pairs unused there
    message = node.validate_inputs(mode="concept_vector", pairs=too_many)
    assert message.startswith("Attack Prompt, input 'pairs'") and f"at most {limit} pairs" in message
    assert "input 'pairs'" in node.validate_inputs(mode="concept_vector", pairs="x" * 10**6)
    assert "input 'carrier'" in node.validate_inputs(carrier="x" * 10**6)
    assert "input 'save_embedding'" in node.validate_inputs(save_embedding="../evil")
    assert node.validate_inputs() is True


class LatentPatcher(FakePatcher):
    """FakePatcher whose BaseModel stand-in has a latent format (SD1.x: 4 channels)."""

    @property
    def model(self):
        return SimpleNamespace(state_dict=lambda: self.weights,
                               latent_format=SimpleNamespace(latent_channels=4))

    def clone(self):
        return LatentPatcher(self.weights, {k: v[:] for k, v in self.patches.items()})


def test_soft_prompts_latent_is_checked_before_any_work(env, models):
    _, clip = models
    original = LatentPatcher(sd1_weights())
    counting = CountingClip()
    for latent, match in (({"samples": torch.zeros(1, 16, 8, 8)}, "4 latent channels, but it has 16"),
                          ({"samples": torch.zeros(0, 4, 8, 8)}, "it is empty"),
                          ({"samples": torch.zeros(4, 8, 8)}, r"\[batch, channels, height, width\], but got \(4, 8, 8\)"),
                          ({}, "but got NoneType")):
        with pytest.raises(env.core.ConfigError, match=match) as info:
            _attack(env, original, counting, mode="soft_prompt", original_model=original.clone(), latent=latent)
        assert info.value.input_name == "latent" and str(info.value).startswith("Attack Prompt")
    assert counting.encodes == 0 and not original.patches
    # other modes do not read it
    out = _attack(env, original, clip, mode="concept_vector", latent={"samples": torch.zeros(1, 16, 8, 8)})
    assert out.result[4]
