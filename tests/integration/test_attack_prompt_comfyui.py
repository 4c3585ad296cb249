"""Attack Prompt inside a real ComfyUI (in-process, --cpu) on the tiny SD1.5 checkpoint: every mode
through the node under inference mode, its conditioning sampled by ComfyUI's KSampler path."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.comfyui


def _run(node_cls, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return node_cls.execute(**inputs)


def _defaults():
    from concept_erasure_pack.nodes.attack_prompt import AttackPrompt

    return {w.id: w.default for w in AttackPrompt.define_schema().inputs
            if w.id not in ("model", "clip", "original_model", "latent")}


def _attack(model, clip, **inputs):
    from concept_erasure_pack.nodes.attack_prompt import AttackPrompt

    return _run(AttackPrompt, model=model, clip=clip, **(_defaults() | {"concept": "Van Gogh"} | inputs))


@pytest.fixture(scope="module")
def erased(pack, tiny_checkpoint):
    """The UCE-erased tiny model. Afterwards the original is loaded again, so later tests that read
    the shared checkpoint's live weights (model_state_dict gives the loaded clone's) see the base."""
    import comfy.model_management
    from test_nodes_comfyui import _erase

    model, clip, _ = tiny_checkpoint
    yield _erase(pack, model, clip, "Van Gogh", "a painter")[0]
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)


def _ksample(model, positive, negative, seed=3):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, latent,
                                   seed=seed, disable_pbar=True).float()


def _negative(clip):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(""))


def test_closed_form_recovers_the_uce_erasure_and_samples(pack, tiny_checkpoint, erased):
    model, clip, _ = tiny_checkpoint
    out = _attack(erased, clip, mode="closed_form", reg=1e-6, original_model=model)
    cond, prompt, recovery, noise, report = out.result
    print(report)
    assert recovery > 0.99 and prompt == "" and math.isnan(noise)
    assert cond[0][0].shape == (1, 77, 768)
    sample = _ksample(erased, cond, _negative(clip))
    assert sample.shape == (1, 4, 8, 8) and torch.isfinite(sample).all()
    plain = _attack(erased, clip, mode="closed_form", reg=10.0, original_model=model).result[2]
    assert plain < recovery  # a heavy ridge recovers less


def test_concept_vector_with_search_samples(pack, tiny_checkpoint, erased):
    model, clip, _ = tiny_checkpoint
    out = _attack(erased, clip, mode="concept_vector", carrier="a village at night",
                  pairs="a painting by Van Gogh | a painting", search_steps=2, search_tokens=4,
                  search_population=4, random_seed=5, original_model=model)
    cond, prompt, recovery, _, report = out.result
    print(report, "|", prompt)
    assert prompt and not math.isnan(recovery) and "token search: 2 generations" in report
    again = _attack(erased, clip, mode="concept_vector", carrier="a village at night",
                    pairs="a painting by Van Gogh | a painting", search_steps=2, search_tokens=4,
                    search_population=4, random_seed=5, original_model=model).result
    assert again[1] == prompt and torch.equal(again[0][0][0], cond[0][0])
    assert torch.isfinite(_ksample(erased, cond, _negative(clip))).all()


def test_differentiable_clip_matches_comfyuis_encoding(pack, tiny_checkpoint):
    from concept_erasure_pack.nodes import _comfy

    _, clip, _ = tiny_checkpoint
    with torch.inference_mode():
        tokens = clip.tokenize("a painting by Van Gogh")
        want = clip.encode_from_tokens(tokens)[0].float()
        text = _comfy.DifferentiableClip(clip, torch.device("cpu"))
        ids = torch.tensor([t[0] for t in tokens["l"][0]])
    with torch.inference_mode(False):
        got = text.forward(text.table[ids][None], int((ids == 49407).nonzero()[0]))[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        clip_skip = clip.clone()
        clip_skip.clip_layer(-2)
        want2 = clip_skip.encode_from_tokens(tokens)[0].float()
        text2 = _comfy.DifferentiableClip(clip_skip, torch.device("cpu"))
    with torch.inference_mode(False):
        got2 = text2.forward(text2.table[ids][None], 6)[0]
    torch.testing.assert_close(got2, want2, rtol=1e-3, atol=1e-3)


def test_soft_prompt_lowers_its_loss_in_inference_mode_and_saves_an_embedding(pack, tiny_checkpoint, erased):
    import folder_paths

    model, clip, _ = tiny_checkpoint
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    _ksample(model, _negative(clip), _negative(clip))  # load the original: its live weights are the base ones
    before = {k: v.clone() for k, v in model.model_state_dict(filter_prefix="diffusion_model.").items()}
    out = _attack(erased, clip, mode="soft_prompt", prefix_tokens=2, steps=4, lr=5e-2, noise_samples=2,
                  random_seed=1, latent=latent, original_model=model, save_embedding="ce_test_attack",
                  overwrite=True)
    cond, prompt, recovery, noise, report = out.result
    print(report, "|", prompt)
    first, best = report.split("soft_prompt loss ")[1].split(" (best")[0].split(" -> ")
    assert float(best) < float(first)
    assert not math.isnan(noise) and not math.isnan(recovery) and prompt.endswith("Van Gogh")
    assert cond[0][0].shape == (1, 77, 768)
    assert torch.isfinite(_ksample(erased, cond, _negative(clip))).all()
    # the embedding file loads as `embedding:ce_test_attack` in a prompt
    import safetensors.torch

    path = folder_paths.get_full_path("embeddings", "ce_test_attack.safetensors")
    saved = safetensors.torch.load_file(path)
    assert list(saved) == ["clip_l"] and saved["clip_l"].shape == (2, 768)
    with_embedding = clip.clone()
    with_embedding.tokenizer.clip_l.embedding_directory = folder_paths.get_folder_paths("embeddings")
    with torch.inference_mode():
        typed = with_embedding.encode_from_tokens(with_embedding.tokenize("embedding:ce_test_attack Van Gogh"))
    torch.testing.assert_close(typed[0].float(), cond[0][0][0], rtol=1e-3, atol=1e-3)
    _ksample(model, cond, _negative(clip))  # the original loads again: its weights are restored
    after = model.model_state_dict(filter_prefix="diffusion_model.")
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed, changed[:3]


def test_soft_prompt_is_reproducible_for_a_seed(pack, tiny_checkpoint, erased):
    model, clip, _ = tiny_checkpoint
    options = {"mode": "soft_prompt", "prefix_tokens": 1, "steps": 1, "lr": 5e-2, "noise_samples": 1,
               "latent": {"samples": torch.zeros(1, 4, 8, 8)}, "original_model": model}
    runs = [_attack(erased, clip, random_seed=seed, **options).result for seed in (4, 4, 9)]
    assert torch.equal(runs[0][0][0][0], runs[1][0][0][0]) and runs[0][1:4] == runs[1][1:4]
    assert not torch.equal(runs[0][0][0][0], runs[2][0][0][0])


def test_closed_form_recovers_less_from_a_rece_hardened_erasure(pack, tiny_checkpoint, erased):
    from concept_erasure_pack.erasure_core import make_config
    from test_nodes_comfyui import _erase

    model, clip, _ = tiny_checkpoint
    hardened = _erase(pack, model, clip, "Van Gogh", "a painter", method="rece",
                      options=make_config("rece", epochs=2, reg=1e-2))[0]
    scores = {name: _attack(m, clip, mode="closed_form", reg=1e-4, original_model=model).result[2]
              for name, m in (("uce", erased), ("rece", hardened))}
    print(scores)
    assert scores["uce"] > 0.99 and scores["rece"] < scores["uce"] - 0.01


def test_soft_prompt_refuses_a_latent_of_another_model_or_an_empty_one(pack, tiny_checkpoint, erased):
    from concept_erasure_pack.erasure_core import ConfigError

    model, clip, _ = tiny_checkpoint
    for samples, match in ((torch.zeros(1, 16, 8, 8), "4 latent channels, but it has 16"),
                           (torch.zeros(0, 4, 8, 8), "it is empty")):
        with pytest.raises(ConfigError, match=match) as info:
            _attack(erased, clip, mode="soft_prompt", steps=1, noise_samples=1, latent={"samples": samples},
                    original_model=model)
        assert info.value.input_name == "latent"
