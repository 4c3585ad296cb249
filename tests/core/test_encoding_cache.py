from __future__ import annotations

import pytest
import torch
from fakes import tiny_encoder

from erasure_core.text.cache import CachedEncoder
from erasure_core.text.encoded import EncodedText, LayerStates


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


def _cache_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_the_cache_stays_under_its_cap_and_drops_the_least_recently_used(tmp_path):
    inner = Counting()
    one = inner.encoder(["p0"]).hidden[0]
    per_prompt = one.numel() * 4 + 8 + 4 * one.shape[0] * 2  # hidden + eot + ids (int64 = 8 bytes per id)
    cap = int(3.5 * per_prompt)
    for i in range(6):
        CachedEncoder(inner, tmp_path, "fp", max_bytes=cap)([f"p{i}"])
        assert _cache_bytes(tmp_path) <= cap + 4096  # the safetensors header on top
    CachedEncoder(inner, tmp_path, "fp", max_bytes=cap)(["p3"])  # p3 becomes the most recent
    calls = len(inner.calls)
    CachedEncoder(inner, tmp_path, "fp", max_bytes=cap)(["p6"])  # evicts the oldest: p4, not p3
    CachedEncoder(inner, tmp_path, "fp", max_bytes=cap)(["p3"])
    assert len(inner.calls) == calls + 1, "p3 was evicted although it was used recently"
    CachedEncoder(inner, tmp_path, "fp", max_bytes=cap)(["p4"])
    assert len(inner.calls) == calls + 2


def test_other_encoders_files_are_dropped_oldest_first_past_the_cap(tmp_path):
    inner = Counting()
    CachedEncoder(inner, tmp_path, "old")(["a", "b"])
    cap = int(1.5 * _cache_bytes(tmp_path))
    CachedEncoder(inner, tmp_path, "new", max_bytes=cap)(["c", "d"])
    assert not (tmp_path / "old.safetensors").exists() and (tmp_path / "new.safetensors").exists()


def test_a_zero_cap_caches_nothing_and_a_nan_row_is_encoded_again(tmp_path):
    inner = Counting()
    CachedEncoder(inner, tmp_path, "fp", max_bytes=0)(["a"])
    assert not list(tmp_path.glob("*.safetensors"))
    CachedEncoder(inner, tmp_path, "fp")(["a"])
    from safetensors.torch import load_file, save_file
    entries = load_file(tmp_path / "fp.safetensors")
    for key in entries:
        if key.endswith(".hidden"):
            entries[key][0, 0] = float("nan")
    save_file(entries, tmp_path / "fp.safetensors")
    out = CachedEncoder(inner, tmp_path, "fp")(["a"])
    assert len(inner.calls) == 3 and bool(torch.isfinite(out.hidden).all())


class RowsCounting(Counting):
    accepts_rows = True

    def __call__(self, texts, rows="all"):
        self.calls.append((list(texts), rows))
        return self.encoder(texts, rows=rows)


def test_through_eot_requests_keep_each_prompt_up_to_its_eot_and_all_rows_serve_them_too(tmp_path):
    inner = RowsCounting()
    short = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a big red car"], rows="through_eot")
    assert short.hidden.shape[1] == int(short.eot_index.max()) + 1
    full = inner.encoder(["a cat", "a big red car"])
    for i, eot in enumerate(full.eot_index.tolist()):
        torch.testing.assert_close(short.hidden[i, : eot + 1], full.hidden[i, : eot + 1], rtol=1e-5, atol=1e-5)
        assert not short.hidden[i, eot + 1 :].any()  # rows after a prompt's EOT: zero
    cached = CachedEncoder(inner, tmp_path, "fp")
    again = cached(["a big red car"], rows="through_eot")  # from the cache, cut to its own length
    assert (cached.hits, cached.misses) == (1, 0) and again.hidden.shape[1] == int(again.eot_index[0]) + 1
    whole = cached(["a cat", "a dog"])  # all rows: through-EOT entries do not serve them
    assert inner.calls[-1] == (["a cat", "a dog"], "all") and whole.hidden.shape[1] == full.hidden.shape[1]
    cached(["a dog"], rows="through_eot")  # ... but a full entry serves a through-EOT request
    assert inner.calls[-1] == (["a cat", "a dog"], "all") and cached.hits == 2


def test_an_encoder_without_rows_is_asked_for_all_rows_and_cached_whole(tmp_path):
    inner = Counting()
    out = CachedEncoder(inner, tmp_path, "fp")(["a cat"], rows="through_eot")
    assert inner.calls == [["a cat"]] and out.hidden.shape[1] == int(out.eot_index[0]) + 1
    whole = CachedEncoder(inner, tmp_path, "fp")(["a cat"])
    assert len(inner.calls) == 1 and whole.hidden.shape[1] == inner.encoder.config.context_length


class LastWordCounting(RowsCounting):
    accepts_last_word = True


def test_through_last_word_requests_keep_each_prompt_up_to_its_last_word_and_wider_entries_serve_them(tmp_path):
    inner = LastWordCounting()
    lead = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a big red car", ""], rows="through_last_word")
    assert inner.calls == [(["a cat", "a big red car", ""], "through_last_word")]
    full = inner.encoder(["a cat", "a big red car", ""])
    assert lead.hidden.shape[1] == int(full.eot_index.max()) + 1
    for i, eot in enumerate(full.eot_index.tolist()):
        stop = max(eot, 1)  # "": its start token
        torch.testing.assert_close(lead.hidden[i, :stop], full.hidden[i, :stop], rtol=1e-5, atol=1e-5)
        assert not lead.hidden[i, stop:].any()
    cached = CachedEncoder(inner, tmp_path, "fp")
    again = cached(["a big red car"], rows="through_last_word")
    assert (cached.hits, cached.misses) == (1, 0) and again.hidden.shape[1] == int(again.eot_index[0]) + 1
    head = cached(["a cat", "a dog"], rows="through_eot")  # last-word entries lack the EOT row
    assert inner.calls[-1] == (["a cat", "a dog"], "through_eot")
    torch.testing.assert_close(head.hidden[0, : int(head.eot_index[0]) + 1],
                               full.hidden[0, : int(full.eot_index[0]) + 1], rtol=1e-5, atol=1e-5)
    cached(["a cat", "a dog"], rows="through_last_word")  # ... and a through-EOT entry serves a last-word one
    assert inner.calls[-1] == (["a cat", "a dog"], "through_eot") and cached.misses == 2


def test_an_encoder_that_stops_only_at_the_eot_is_cached_through_the_eot(tmp_path):
    inner = RowsCounting()
    CachedEncoder(inner, tmp_path, "fp")(["a cat"], rows="through_last_word")
    assert inner.calls == [(["a cat"], "through_eot")]
    cached = CachedEncoder(inner, tmp_path, "fp")
    cached(["a cat"], rows="through_eot")  # stored as a through-EOT entry: serves this too
    assert (cached.hits, cached.misses) == (1, 0)


class LayeredCounting(Counting):
    """Adds a second encoder's per-layer states [N, 2, T, 8] with its own EOT, like HiDream's Llama."""

    def __init__(self, layers=True):
        super().__init__()
        self.layers = layers

    def __call__(self, texts):
        enc = super().__call__(texts)
        if not self.layers:
            return enc
        hidden = torch.stack([enc.hidden[..., :8], 2 * enc.hidden[..., 8:16]], dim=1)
        eot = (enc.eot_index + 1).clamp(max=hidden.shape[2] - 1)
        return EncodedText(enc.texts, enc.hidden, enc.eot_index, enc.pooled, enc.token_ids,
                           {"llama": LayerStates(hidden, eot, enc.token_ids)})


def test_per_layer_states_are_cached_with_their_own_eot_and_served_again(tmp_path):
    inner = LayeredCounting()
    first = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a dog"])
    second = CachedEncoder(inner, tmp_path, "fp")(["a dog", "a cat"])
    assert inner.calls == [["a cat", "a dog"]]
    a, b = first.layered["llama"], second.layered["llama"]
    assert torch.equal(b.hidden, a.hidden[[1, 0]]) and b.eot_index.tolist() == a.eot_index[[1, 0]].tolist()
    assert torch.equal(b.token_ids, a.token_ids[[1, 0]])
    short = CachedEncoder(inner, tmp_path, "fp")(["a cat"], rows="through_eot").layered["llama"]
    assert short.hidden.shape[2] == int(a.eot_index[0]) + 1 and torch.equal(short.hidden[0], a.hidden[0, :, :short.hidden.shape[2]])


def test_cached_prompts_without_the_per_layer_states_are_encoded_again(tmp_path):
    CachedEncoder(LayeredCounting(layers=False), tmp_path, "fp")(["a cat"])
    inner = LayeredCounting()
    out = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a dog"])
    assert inner.calls == [["a dog"], ["a cat"]]  # the new layout: the cached prompt is encoded again
    again = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a dog"])
    assert "llama" in again.layered and again.layered["llama"].hidden.shape[:2] == (2, 2)
    assert out.hidden.shape[0] == 2


def test_eviction_drops_a_prompts_per_layer_states_with_it(tmp_path):
    inner = LayeredCounting()
    cache = CachedEncoder(inner, tmp_path, "fp", max_bytes=10**9)
    cache(["p0", "p1", "p2"])
    three = sum(t.numel() * t.element_size() for t in cache._entries.values())
    CachedEncoder(inner, tmp_path, "fp", max_bytes=three // 2)(["p3"])
    from safetensors.torch import load_file

    left = load_file(tmp_path / "fp.safetensors")
    prompts = {k.rsplit(".", 1)[0] for k in left}
    assert 1 <= len(prompts) < 4
    assert all(any(k.startswith(p + ".layers-llama") for k in left) for p in prompts)
    assert all(p + ".eot" in left for p in prompts)  # no per-layer states outlive their prompt's own rows


def test_a_fully_cached_request_with_repeats_returns_every_occurrence(tmp_path):
    """All cached: the checked stack is the output, except when a prompt repeats (then each
    occurrence is stacked again); both equal the first run's rows."""
    inner = Counting()
    first = CachedEncoder(inner, tmp_path, "fp")(["a cat", "a dog"])
    for texts, order in ((["a dog", "a cat"], [1, 0]), (["a cat", "a dog", "a cat"], [0, 1, 0])):
        for rows in ("all", "through_eot"):
            out = CachedEncoder(inner, tmp_path, "fp")(texts, rows=rows)
            expected = first.hidden[order].clone()
            if rows == "through_eot":
                for i, e in enumerate(first.eot_index[order].tolist()):
                    expected[i, e + 1:] = 0
            torch.testing.assert_close(out.hidden[:, : expected.shape[1]], expected[:, : out.hidden.shape[1]],
                                       rtol=0, atol=0)
            assert out.texts == tuple(texts)
    assert inner.calls == [["a cat", "a dog"]]


@pytest.mark.parametrize("chunk", [1 << 30, 1])  # every prompt in one check / one prompt per check
def test_only_the_cached_prompt_with_a_nan_row_is_encoded_again(tmp_path, monkeypatch, chunk):
    from safetensors.torch import load_file, save_file

    from erasure_core.text import cache as cache_module

    monkeypatch.setattr(cache_module, "FINITE_CHUNK", chunk)
    inner = Counting()
    CachedEncoder(inner, tmp_path, "fp")(["a", "b", "c"])
    entries = load_file(tmp_path / "fp.safetensors")
    bad = next(k for k in entries if k.endswith(".hidden") and k.startswith(cache_module._key("b")))
    entries[bad][0, 0] = float("nan")
    save_file(entries, tmp_path / "fp.safetensors")
    out = CachedEncoder(inner, tmp_path, "fp")(["a", "b", "c"])
    assert inner.calls[-1] == ["b"] and bool(torch.isfinite(out.hidden).all())
