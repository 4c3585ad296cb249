"""Closed-Form Erase's short CLIP encoding in real ComfyUI: stopping each batch at its longest
prompt's end of text gives the rows of the full 77-token encoding (SD1 with and without clip skip,
weighted prompts, SDXL's two towers), and encoders that are not causal CLIPs run their whole window."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.comfyui

PROMPTS = ["van gogh", "a painting by claude monet", "", "(an oil painting:1.3) of a [cat]",
           "Felix Broel", "a photo of a dog sitting on a red sofa in the garden"]
# plain token ids at weight 1, sharing prefixes: these go through the prefix tree
PLAIN = [p for p in PROMPTS if "(" not in p] + ["a painting by claude", "a photo of a dog", "Felix Brown"]


def _count_tree_passes(monkeypatch, text) -> list[int]:
    """Spy on the prefix-tree pass; returns the list it appends each pass's prompt count to."""
    calls: list[int] = []
    real = text.encode_causal_tree

    def spy(clip, tokens):
        calls.append(len(next(iter(tokens.values()))))
        return real(clip, tokens)

    monkeypatch.setattr(text, "encode_causal_tree", spy)
    return calls


def _assert_same_rows(short, full):
    assert short.hidden.shape[1] == int(full.eot_index.max()) + 1 < full.hidden.shape[1]
    assert torch.equal(short.eot_index, full.eot_index)
    for i, eot in enumerate(full.eot_index.tolist()):
        want, got = full.hidden[i, : eot + 1], short.hidden[i, : eot + 1]
        scale = want.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(short.token_ids[i, : eot + 1], full.token_ids[i, : eot + 1])


def _encoders(pack, clip):
    text = pack.nodes._comfy.text
    return text.ComfyClipEncoder(clip), text


@pytest.mark.parametrize("prompts", [PROMPTS, PLAIN], ids=["weighted", "plain"])
@pytest.mark.parametrize("skip", [None, -2, -5])
def test_sd1_short_rows_equal_the_full_window(pack, tiny_checkpoint, skip, prompts, monkeypatch):
    clip = tiny_checkpoint[1]
    if skip is not None:
        clip = clip.clone()
        clip.clip_layer(skip)
    encoder, text = _encoders(pack, clip)
    assert text.causal_towers(clip) is not None
    tree_passes = _count_tree_passes(monkeypatch, text)
    _assert_same_rows(encoder(prompts, rows="through_eot"), encoder(prompts, rows="all"))
    # the weights syntax needs ComfyUI's empty-prompt blend: no tree then
    assert tree_passes == ([len(PLAIN)] if prompts is PLAIN else [])


def test_sd1_short_rows_equal_encode_from_tokens_of_each_prompt(pack, tiny_checkpoint):
    clip = tiny_checkpoint[1]
    encoder, _ = _encoders(pack, clip)
    short = encoder(PROMPTS, rows="through_eot")
    for i, prompt in enumerate(PROMPTS):  # one prompt at a time, as CLIPTextEncode encodes it
        cond = clip.encode_from_tokens(clip.tokenize(prompt))[0].float()
        eot = int(short.eot_index[i])
        torch.testing.assert_close(short.hidden[i, : eot + 1], cond[: eot + 1], rtol=1e-4,
                                   atol=1e-5 * cond.abs().max().item())


def _tiny_sdxl_clip(seed: int = 0):
    """ComfyUI's SDXL text encoder class (CLIP-L hidden -2 + CLIP-G penultimate, concatenated),
    shrunk through ComfyUI's own per-tower config overrides, with seeded random weights."""
    import comfy.sd
    import comfy.sdxl_clip

    small = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "projection_dim": 64}
    target = SimpleNamespace(clip=comfy.sdxl_clip.SDXLClipModel, tokenizer=comfy.sdxl_clip.SDXLTokenizer, params={})
    clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": small,
                                                       "clip_g_model_config": {**small, "hidden_size": 96}})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "embedding" in name else p.shape[1] ** -0.5))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return clip


@pytest.mark.parametrize("prompts", [PROMPTS, PLAIN], ids=["weighted", "plain"])
def test_sdxl_short_rows_equal_the_full_window(pack, prompts, monkeypatch):
    clip = _tiny_sdxl_clip()
    encoder, text = _encoders(pack, clip)
    assert [name for name, _ in text.causal_towers(clip)] == ["l", "g"]
    full = encoder(prompts, rows="all")
    assert full.width == 64 + 96
    tree_passes = _count_tree_passes(monkeypatch, text)
    _assert_same_rows(encoder(prompts, rows="through_eot"), full)
    assert tree_passes == ([len(PLAIN)] if prompts is PLAIN else [])


def test_an_encoder_that_is_not_a_causal_clip_runs_its_whole_window(pack, tiny_checkpoint):
    _, text = _encoders(pack, tiny_checkpoint[1])
    assert text.causal_towers(SimpleNamespace(cond_stage_model=torch.nn.Linear(2, 2))) is None
    wrapped = SimpleNamespace(**vars(tiny_checkpoint[1]))
    wrapped.cond_stage_model = SimpleNamespace(wraps=tiny_checkpoint[1].cond_stage_model)
    wrapped.tokenize = tiny_checkpoint[1].tokenize
    wrapped.encode_from_tokens = tiny_checkpoint[1].encode_from_tokens
    out = text.ComfyClipEncoder(wrapped)(["van gogh"], rows="through_eot")
    assert out.hidden.shape[1] == 77


@pytest.mark.parametrize("prompts", [PROMPTS, PLAIN], ids=["weighted", "plain"])
def test_last_word_rows_equal_the_full_window_up_to_each_last_word(pack, tiny_checkpoint, prompts, monkeypatch):
    encoder, text = _encoders(pack, tiny_checkpoint[1])
    assert encoder.accepts_last_word
    tree_passes = _count_tree_passes(monkeypatch, text)
    lead, full = encoder(prompts, rows="through_last_word"), encoder(prompts, rows="all")
    assert lead.hidden.shape[1] == int(full.eot_index.max()) + 1
    for i, eot in enumerate(full.eot_index.tolist()):
        stop = max(eot, 1)  # "": its start token
        want = full.hidden[i, :stop]
        torch.testing.assert_close(lead.hidden[i, :stop], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        if prompts is PLAIN:  # the tree stops before the EOT; weighted prompts run through it
            assert not lead.hidden[i, stop:].any()
    assert tree_passes == ([len(PLAIN)] if prompts is PLAIN else [])
