"""The stand-alone CLIP tokenizer and text encoder (used by the CLI demo and benchmarks)."""

from __future__ import annotations

import pytest
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


def test_encode_asks_for_rows_only_where_the_encoder_accepts_them():
    from fakes import tiny_encoder

    from erasure_core.text.encoded import TimedEncoder, TokenPick, encode, rows_for

    clip = tiny_encoder()
    assert clip.accepts_rows
    short = encode(clip, ["a cat", "a big red car"], "through_eot")
    assert short.hidden.shape[1] == int(short.eot_index.max()) + 1 < clip.config.context_length
    plain = encode(lambda texts: clip(texts), ["a cat"], "through_eot")  # no accepts_rows: all rows
    assert plain.hidden.shape[1] == clip.config.context_length
    timed = TimedEncoder(clip)
    assert timed.accepts_rows and timed(["a cat"], rows="through_eot").hidden.shape[1] == 4 and timed.seconds > 0
    assert [rows_for(p) for p in TokenPick] == ["all", "through_last_word", "all", "through_eot"]
    lead = encode(clip, ["a cat", ""], "through_last_word")  # stops at the last word ("" at its start token)
    assert lead.hidden.shape[1] == int(lead.eot_index.max()) + 1
    assert not lead.hidden[0, int(lead.eot_index[0])].any() and lead.hidden[1, 0].any()

    class EotOnly:  # stops early, but only at the EOT: asked for the EOT instead
        accepts_rows = True

        def __call__(self, texts, rows="all"):
            self.rows = rows
            return clip(texts, rows=rows)

    eot_only = EotOnly()
    assert encode(eot_only, ["a cat"], "through_last_word").hidden[0, 3].any() and eot_only.rows == "through_eot"
    with pytest.raises(ValueError, match="rows"):
        encode(clip, ["a cat"], "some")
