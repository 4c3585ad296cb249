"""DiT text streams: sites grouped by what they read (tokens through a row norm, the pooled vector),
each solved by the method unchanged with keys equal to what the layer reads."""

from __future__ import annotations

import pytest
import torch
from fakes import edited_weight

from erasure_core import (
    ArchitectureError,
    AttentionSite,
    ConceptSet,
    EncodedText,
    RowTransform,
    TokenPick,
    erase,
    make_config,
)
from erasure_core.methods import names
from erasure_core.methods.streams import StreamView
from erasure_core.text.encoded import LayerStates, erase_rows


class PooledEncoder:
    """A tiny encoder with a pooled vector (its mean row projected to 12 wide), like Flux's CLIP-L."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.proj = torch.randn(32, 12, generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        enc = self.encoder(texts)
        return EncodedText(enc.texts, enc.hidden, enc.eot_index, enc.hidden.mean(1) @ self.proj, enc.token_ids)


def _dit_sites(seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = RowTransform("diffusion_model.txt_norm.weight", 1e-6, torch.rand(32, generator=gen) + 0.5)
    return [AttentionSite("diffusion_model.txt_in.weight", torch.randn(48, 32, generator=gen) / 32**0.5,
                          "tokens", norm),
            AttentionSite("diffusion_model.vector_in.in_layer.weight", torch.randn(48, 12, generator=gen) / 12**0.5,
                          "pooled")]


def test_each_stream_maps_the_targets_keys_as_its_layer_reads_them(encoder):
    sites = _dit_sites()
    pooled = PooledEncoder(encoder)
    concepts = ConceptSet.simple(("cat",), ("dog",))
    config = make_config("uce", lamb=1e-5, preserve_empty_prompt=False, token_pick=TokenPick.LAST_SUBJECT,
                         preserve_bank=False)  # the exact map: nothing else preserved
    patch = erase("uce", sites, concepts, pooled, config)
    assert set(patch.keys()) == {s.key for s in sites} and patch.meta["sites"] == 2
    assert pooled.calls == 1  # one encoding serves both streams
    assert {s["stream"] for s in patch.meta["streams"]} == {"tokens", "pooled"}
    for site in sites:
        enc = StreamView(pooled, site.stream, site.transform)(["cat", "dog"])
        ce, ca = erase_rows(enc, [("cat", "dog")], TokenPick.LAST_SUBJECT)
        w0 = site.weight.double()
        err = (edited_weight(site, patch) @ ce.double().T - w0 @ ca.double().T).abs().max()
        assert err < 1e-4 * (w0 @ (ca - ce).double().T).abs().max()


def test_the_row_norm_is_folded_into_the_keys_not_skipped(encoder):
    site = _dit_sites()[0]
    concepts = ConceptSet.simple(("cat",), ("dog",))
    config = make_config("uce", lamb=1e-5, preserve_empty_prompt=False, token_pick=TokenPick.LAST_SUBJECT,
                         preserve_bank=False)  # the exact map: nothing else preserved
    patch = erase("uce", [site], concepts, encoder, config)
    raw = encoder(["cat", "dog"])
    ce, ca = erase_rows(raw, [("cat", "dog")], TokenPick.LAST_SUBJECT)
    w0, w = site.weight.double(), edited_weight(site, patch)
    normed = site.transform(ce).double()
    assert (w @ normed.T - w0 @ site.transform(ca).double().T).abs().max() < 1e-4
    assert (w @ ce.double().T - w0 @ ca.double().T).abs().max() > 1e-2  # raw rows are not what txt_in reads


def test_a_pooled_site_without_a_pooled_encoder_names_the_clip(encoder):
    from erasure_core import ArchitectureError

    with pytest.raises(ArchitectureError, match="pooled") as err:
        erase("uce", _dit_sites(), ConceptSet.simple(("cat",), ("dog",)), encoder)
    assert err.value.input_name == "clip"


@pytest.mark.parametrize("method", names())
def test_every_method_runs_on_a_two_stream_dit(encoder, method):
    sites = _dit_sites()
    concepts = ConceptSet.simple(("cat", "van gogh"), ("dog", "a painter"), ("a red car",))
    patch = erase(method, sites, concepts, PooledEncoder(encoder), make_config(method))
    assert set(patch.keys()) == {s.key for s in sites} and patch.meta["method"] == method
    assert all(torch.isfinite(patch[s.key].dense()).all() for s in sites)


class LayeredEncoder:
    """A tiny encoder with a second encoder's per-layer states (like HiDream's Llama): 3 layers, 20 wide,
    its own end-of-text one row later than the main stream's."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.mix = torch.randn(3, 32, 20, generator=torch.Generator().manual_seed(6))
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        enc = self.encoder(texts)
        hidden = torch.einsum("ntd,lde->nlte", enc.hidden, self.mix)
        states = LayerStates(hidden, (enc.eot_index + 1).clamp(max=hidden.shape[2] - 1), enc.token_ids)
        return EncodedText(enc.texts, enc.hidden, enc.eot_index, enc.pooled, enc.token_ids, {"llama": states})


def _hidream_sites(seed: int, pooled: bool = False) -> list[AttentionSite]:
    """HiDream-like projections: three read Llama layers 0, 2, 2 (width 20), the last T5's rows (32);
    ``pooled``: and ``p_embedder`` the pooled vector (12)."""
    gen = torch.Generator().manual_seed(seed)
    sites = [AttentionSite(f"caption_projection.{i}.linear.weight", torch.randn(24, 20, generator=gen) / 20**0.5,
                           f"llama:{k}") for i, k in enumerate((0, 2, 2))]
    sites.append(AttentionSite("caption_projection.3.linear.weight", torch.randn(24, 32, generator=gen) / 32**0.5))
    if pooled:
        sites.append(AttentionSite("p_embedder.weight", torch.randn(24, 12, generator=gen) / 12**0.5, "pooled"))
    return sites


def test_each_llama_layer_stream_is_solved_on_that_layers_rows(encoder):
    sites = _hidream_sites(2)
    layered = LayeredEncoder(encoder)
    config = make_config("uce", lamb=1e-5, preserve_empty_prompt=False, token_pick=TokenPick.LAST_SUBJECT,
                         preserve_bank=False)
    patch = erase("uce", sites, ConceptSet.simple(("cat",), ("dog",)), layered, config)
    assert layered.calls == 1 and {s["stream"] for s in patch.meta["streams"]} == {"llama:0", "llama:2", "tokens"}
    for site in sites:
        enc = StreamView(layered, site.stream)(["cat", "dog"])
        ce, ca = erase_rows(enc, [("cat", "dog")], TokenPick.LAST_SUBJECT)
        w0 = site.weight.double()
        err = (edited_weight(site, patch) @ ce.double().T - w0 @ ca.double().T).abs().max()
        assert err < 1e-4 * (w0 @ (ca - ce).double().T).abs().max(), site.key
    view = StreamView(layered, "llama:2")(["cat"])
    full = layered(["cat"])
    assert torch.equal(view.hidden, full.layered["llama"].hidden[:, 2]) and view.eot_index.tolist() == (
        full.eot_index + 1).tolist()


def test_a_layer_stream_the_encoder_does_not_return_is_refused_with_the_fix(encoder):
    with pytest.raises(ArchitectureError, match="per-layer states") as err:
        StreamView(encoder, "llama:3")(["cat"])
    assert err.value.input_name == "clip"
    with pytest.raises(ArchitectureError, match="returns 3 layers"):
        StreamView(LayeredEncoder(encoder), "llama:3")(["cat"])


def test_the_check_sums_every_token_stream_and_leaves_out_the_pooled_one(encoder):
    """HiDream-like sites (two Llama layers, T5, a pooled input): the check's squared gaps and drifts are the
    sums of each token stream's, each measured on that stream's own rows."""
    from erasure_core.methods.check import check_edit

    sites = _hidream_sites(3, pooled=True)
    layered = LayeredEncoder(PooledEncoder(encoder))
    concepts = ConceptSet.simple(("cat",), ("dog",))
    config = make_config("uce", lamb=0.1, token_pick=TokenPick.LAST_SUBJECT, preserve_bank=False)
    patch = erase("uce", sites, concepts, layered, config)
    both = check_edit(sites, patch, concepts, layered, [""], probes=["a red car"])
    per = [check_edit([s for s in sites if s.stream == stream], patch, concepts, layered, [""], probes=["a red car"])
           for stream in ("llama:0", "llama:2", "tokens")]
    assert all(c.gap > 0 for c in per)
    assert both.gap**2 == pytest.approx(sum(c.gap**2 for c in per), rel=1e-9)
    for attr in ("targets", "probes"):
        total = getattr(both, attr)[0][1] ** 2 * both.gap**2
        assert total == pytest.approx(sum(getattr(c, attr)[0][1] ** 2 * c.gap**2 for c in per), rel=1e-9)
