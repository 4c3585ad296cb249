"""The stand-alone CLIP tokenizer and text encoder (used by the CLI demo and benchmarks)."""

from __future__ import annotations

import torch

from erasure_core.text.clip import ClipTextConfig, ClipTextEncoder


def test_tokenizer_matches_clip_ids_for_known_words(clip_tokenizer):
    # ids from CLIP ViT-L/14's vocab.json: a=320, photo=1125, of=539, cat=2368, dog=1929
    assert clip_tokenizer.ids("A photo of a cat") == [320, 1125, 539, 320, 2368]
    assert clip_tokenizer.ids("dog") == [1929]
    ids, eot = clip_tokenizer(["", "a photo of a cat"])
    assert ids.shape == (2, 77) and eot.tolist() == [1, 6]
    assert ids[0, 0] == 49406 and ids[0, 1] == 49407 and ids[1, 6:].eq(49407).all()


def test_encoder_is_causal_so_prefix_rows_do_not_depend_on_later_words(clip_tokenizer):
    enc = ClipTextEncoder(ClipTextConfig(width=64, layers=2, heads=2), clip_tokenizer, seed=3)
    out = enc(["a photo of a cat", "a photo of a dog"])
    torch.testing.assert_close(out.hidden[0, :5], out.hidden[1, :5])
    assert not torch.allclose(out.hidden[0, 5], out.hidden[1, 5])
