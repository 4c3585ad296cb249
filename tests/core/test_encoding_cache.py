from __future__ import annotations

import torch
from fakes import tiny_encoder

from erasure_core.text.cache import CachedEncoder


class Counting:
    def __init__(self):
        self.encoder, self.calls = tiny_encoder(), []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return self.encoder(texts)


def test_a_second_run_reads_the_cache_instead_of_encoding(tmp_path):
    inner = Counting()
    first = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a dog", "a cat"])
    second = CachedEncoder(inner, tmp_path, "fp")(["a dog", "a cat"])
    assert inner.calls == [["a cat", "a dog"]]
    torch.testing.assert_close(second.hidden, first.hidden[[1, 0]], rtol=0, atol=0)
    assert second.eot_index.tolist() == first.eot_index[[1, 0]].tolist()
    assert torch.equal(second.token_ids, first.token_ids[[1, 0]])


def test_only_missing_prompts_are_encoded(tmp_path):
    inner = Counting()
    CachedEncoder(inner, tmp_path, "fp")(["a cat"])
    cached = CachedEncoder(inner, tmp_path, "fp")
    out = cached(["a cat", "a red car"])
    assert inner.calls[-1] == ["a red car"] and (cached.hits, cached.misses) == (1, 1)
    fresh = inner.encoder(["a cat", "a red car"]).hidden  # batch shape changes rounding only
    torch.testing.assert_close(out.hidden, fresh, rtol=1e-5, atol=1e-5)


def test_another_fingerprint_encodes_again(tmp_path):
    inner = Counting()
    CachedEncoder(inner, tmp_path, "one")(["a cat"])
    CachedEncoder(inner, tmp_path, "two")(["a cat"])
    assert len(inner.calls) == 2


def test_an_unreadable_cache_is_rebuilt(tmp_path, caplog):
    (tmp_path / "fp.safetensors").write_bytes(b"not a safetensors file")
    inner = Counting()
    out = CachedEncoder(inner, tmp_path, "fp")(["a cat"])
    assert inner.calls == [["a cat"]] and out.hidden.shape[0] == 1
    assert "ignoring unreadable encoding cache" in caplog.text
    CachedEncoder(inner, tmp_path, "fp")(["a cat"])
    assert len(inner.calls) == 1
