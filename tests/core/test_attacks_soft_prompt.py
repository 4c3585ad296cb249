"""soft_prompt core: the loop lowers a noise-prediction loss through a tiny differentiable text
encoder and a toy cross-attention denoiser; sampling and projection are seeded and exact."""

from __future__ import annotations

import pytest
import torch

from erasure_core import ConfigError, NumericalError
from erasure_core.attacks import draw_noise_samples, eps_from_denoised, nearest_tokens, optimise_prefix


def _encode_with_prefix(encoder, ids):
    """Out-of-place forward of the tiny CLIP with ``prefix`` rows spliced after the start token."""

    def encode(prefix):
        emb = encoder.token_embedding.weight[ids]  # [T, D]
        k = prefix.shape[0]
        x = torch.cat([emb[:1], prefix, emb[1 : emb.shape[0] - k]])[None] + encoder.position_embedding
        return encoder.forward_embeddings(x)[0]

    return encode


def _denoiser(sites):
    """x̂₀ = x − σ·ε̂ with ε̂ a cross-attention readout of the context through the K/V sites."""
    ks, vs = [s.weight for s in sites[0::2]], [s.weight for s in sites[1::2]]

    def denoise(x, sigma, cond):  # x: [S, C], cond: [T, d]
        eps = torch.zeros_like(x)
        for wk, wv in zip(ks, vs, strict=True):
            q = x @ torch.ones(x.shape[1], wk.shape[0]) / x.shape[1]
            att = torch.softmax(q @ (cond @ wk.T).T, dim=-1)
            eps = eps + (att @ (cond @ wv.T))[:, : x.shape[1]]
        return x - sigma[:, None] * eps

    return denoise


def test_a_few_steps_lower_the_noise_prediction_loss(sites, encoder):
    erased = [type(s)(s.key, s.weight * (0.5 if i % 2 else 1.0)) for i, s in enumerate(sites)]
    ids, _ = encoder.tokenizer(["van gogh"])
    concept = encoder(["van gogh"]).hidden[0]
    percents, noise = draw_noise_samples(3, (16,), seed=0)
    sigma = 0.5 + percents.float()
    x = noise * sigma[:, None]
    target = eps_from_denoised(x, _denoiser(sites)(x, sigma, concept), sigma).detach()
    encode, erased_model = _encode_with_prefix(encoder, ids[0]), _denoiser(erased)

    def loss(prefix):
        return ((eps_from_denoised(x, erased_model(x, sigma, encode(prefix)), sigma) - target) ** 2).mean()

    init = encoder.token_embedding.weight[torch.tensor([7, 8])]
    steps = []
    result = optimise_prefix(init, loss, steps=5, lr=5e-2, progress=lambda d, t: steps.append((d, t)))
    assert len(result.losses) == 6 and steps == [(i, 5) for i in range(1, 6)]
    assert result.best_loss < result.losses[0]
    assert float(loss(result.prefix)) == pytest.approx(result.best_loss, rel=1e-5)
    assert not result.prefix.requires_grad


def test_the_loop_runs_under_inference_mode(encoder):
    target = torch.randn(4)
    with torch.inference_mode():
        result = optimise_prefix(torch.zeros(1, 4), lambda p: ((p[0] - target) ** 2).sum(), steps=3, lr=0.1)
    assert result.best_loss < result.losses[0]


def test_bad_settings_and_divergence_are_refused():
    with pytest.raises(ConfigError):
        optimise_prefix(torch.zeros(1, 4), lambda p: p.sum(), steps=0, lr=0.1)
    with pytest.raises(NumericalError, match="finite"):
        optimise_prefix(torch.zeros(1, 4), lambda p: p.sum() / 0.0, steps=2, lr=0.1)


def test_noise_samples_are_seeded_and_stratified():
    p1, n1 = draw_noise_samples(4, (2, 3), seed=11)
    p2, n2 = draw_noise_samples(4, (2, 3), seed=11)
    assert torch.equal(p1, p2) and torch.equal(n1, n2) and n1.shape == (4, 2, 3)
    edges = torch.linspace(0.02, 0.98, 5, dtype=torch.float64)
    assert bool(((p1 >= edges[:-1]) & (p1 <= edges[1:])).all())


def test_eps_from_denoised_inverts_the_noising():
    x0, eps, sigma = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0.3, 2.0])
    torch.testing.assert_close(eps_from_denoised(x0 + sigma[:, None] * eps, x0, sigma), eps)


def test_nearest_tokens_finds_the_rows_and_respects_allowed():
    table = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert nearest_tokens(table[[3, 17]] * 2.0, table).tolist() == [3, 17]
    allowed = torch.tensor([5, 6, 17])
    assert nearest_tokens(table[[3, 17]], table, allowed)[1].item() == 17
    assert nearest_tokens(table[[3]], table, allowed)[0].item() in {5, 6, 17}
