"""RECE on the tiny seeded sites and encoder, against float64 references written straight from the
paper's equations (research/algorithms.md §3), one layer at a time."""

from __future__ import annotations

import pytest
import torch

from erasure_core import ConceptSet, erase, make_config
from erasure_core.methods.rece import adversarial_rows

TARGETS = ("van gogh", "picasso")
ANCHOR = "a painter"
PRESERVE = ("monet", "a red car")


def _concepts():
    return ConceptSet.simple(TARGETS, (ANCHOR,), PRESERVE)


def _rows(encoder, prompt):
    """Every token row of one prompt, ``[T, d]`` float64."""
    return encoder([prompt]).hidden[0].double()


def _reference_adversarial(c, originals, edited, reg):
    """RECE ``close_regzero``: c' = (Σ_l W'_lᵀW'_l + λ_reg I)⁻¹ (Σ_l W'_lᵀ W_l) c for every row of ``c``."""
    d = c.shape[1]
    lhs = sum(we.T @ we for we in edited) + reg * torch.eye(d, dtype=torch.float64)
    rhs = sum(we.T @ w for w, we in zip(originals, edited, strict=True))
    return (torch.linalg.inv(lhs) @ rhs @ c.T).T


def _aligned(encoder, target, anchor):
    """UCE's paper-era pick (train_erase.py): rows from the last word on, aligned, both blocks
    ``T − farthest`` long (``farthest`` = the later last-word position)."""
    enc = encoder([target, anchor])
    ft, fa = (int(e) - 1 for e in enc.eot_index)
    farthest, length = max(ft, fa), enc.hidden.shape[1]
    return enc.hidden[0, ft: length - (farthest - ft)].double(), enc.hidden[1, fa: length - (farthest - fa)].double()


def _weights(sites, patch=None):
    """Original weights and, with a patch, the edited ones (float64, in site order)."""
    originals = [s.weight.double() for s in sites]
    if patch is None:
        return originals
    return originals, [w + patch[s.key].dense().double() for w, s in zip(originals, sites, strict=True)]


def test_adversarial_rows_equal_the_per_site_float64_closed_form(sites):
    gen = torch.Generator().manual_seed(7)
    d = sites[0].in_features
    m = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    c = torch.randn(8, d, generator=gen, dtype=torch.float64)
    originals = _weights(sites)
    gram = sum(w.T @ w for w in originals)
    for reg in (1e-3, 1e-1):
        ref = _reference_adversarial(c, originals, [w @ m for w in originals], reg)
        torch.testing.assert_close(adversarial_rows(c, gram, m, reg), ref, rtol=1e-9, atol=1e-9)


def test_zero_epochs_is_uce_with_the_same_options(sites, encoder):
    shared = {"lamb": 0.5, "preserve_scale": 0.3, "erase_scale": 1.2}
    uce = erase("uce", sites, _concepts(), encoder, make_config("uce", preserve_bank=False, **shared))
    rece = erase("rece", sites, _concepts(), encoder, make_config("rece", preserve_bank=False, epochs=0, **shared))
    assert sorted(rece.keys()) == sorted(uce.keys()) == sorted(s.key for s in sites)
    for key in uce.keys():
        torch.testing.assert_close(rece[key].dense(), uce[key].dense(), rtol=1e-5, atol=1e-6)


# 2 targets: fewer token rows than the width (row-wise steps); 6: more (steps from Grams, full rank)
@pytest.mark.parametrize("targets", [TARGETS, ("van gogh", "picasso", "w1", "w2", "w3", "w4")])
@pytest.mark.parametrize("keep_erased", [False, True])
def test_one_epoch_equals_the_per_layer_float64_adversarial_uce_step(sites, encoder, targets, keep_erased):
    """keep_erased off: the paper's step (adversarial rows -> the edited model's anchor rows);
    on: the target's own UCE rows join the step, and every row maps to the ridge preimage under
    the edited weights of its anchor rows (what the original model made of the anchor)."""
    config = make_config("rece", preserve_bank=False, epochs=1, keep_erased=keep_erased)
    uce_options = {k: getattr(config, k) for k in
                   ("token_pick", "erase_scale", "preserve_scale", "lamb", "preserve_empty_prompt", "solve_dtype")}
    concepts = ConceptSet.simple(targets, (ANCHOR,), PRESERVE)
    rows = sum(len(_rows(encoder, t)) for t in targets)
    assert (rows > sites[0].in_features) == (len(targets) > 2)
    start = erase("uce", sites, concepts, encoder, make_config("uce", preserve_bank=False, **uce_options))
    rece = erase("rece", sites, concepts, encoder, config)
    originals, w1s = _weights(sites, start)
    d = sites[0].in_features
    eye = torch.eye(d, dtype=torch.float64)
    # c' for each target's 8 token rows, over every site (all share the width here).
    adv = [_reference_adversarial(_rows(encoder, t), originals, w1s, config.reg) for t in targets]
    guide = _rows(encoder, ANCHOR)  # aligned with the target rows by position
    keep = [*PRESERVE, ""]  # preserve_empty_prompt is on by default
    cp = torch.cat([_rows(encoder, p) for p in keep])
    lam, eta = config.adv_lamb, config.adv_preserve_scale
    assert config.preserve_empty_prompt and (lam, eta) == (0.1, 0.1)
    keys, values = adv, [guide] * len(adv)
    if keep_erased:
        own = [_aligned(encoder, t, ANCHOR) for t in targets]
        keys = [*(o for o, _ in own), *adv]
        values = [_reference_adversarial(v, originals, w1s, config.reg) for v in [*(a for _, a in own), *values]]
    for site, w, w1 in zip(sites, originals, w1s, strict=True):
        mat1 = lam * w1 + sum(w1 @ v.T @ c for c, v in zip(keys, values, strict=True)) + eta * w1 @ cp.T @ cp
        mat2 = lam * eye + sum(c.T @ c for c in keys) + eta * cp.T @ cp
        ref = mat1 @ torch.linalg.inv(mat2) - w
        scale = ref.abs().max().item()
        torch.testing.assert_close(rece[site.key].dense().double(), ref, rtol=1e-5, atol=1e-5 * scale)


def test_adversarial_embedding_recovers_less_of_the_target_with_each_epoch(sites, encoder):
    """Residual Σ_l ‖W'_l c' − W_l c‖ / ‖W_l c‖ of the closed-form attack on the target's rows."""
    reg = make_config("rece", preserve_bank=False).reg
    c = _rows(encoder, TARGETS[0])

    def residual(patch):
        originals, edited = _weights(sites, patch)
        adv = _reference_adversarial(c, originals, edited, reg)
        return sum(((we @ adv.T - w @ c.T).norm() / (w @ c.T).norm()).item()
                   for w, we in zip(originals, edited, strict=True))

    uce = residual(erase("uce", sites, _concepts(), encoder, make_config("uce", preserve_bank=False)))
    by_epoch = [residual(erase("rece", sites, _concepts(), encoder, make_config("rece", preserve_bank=False, epochs=n)))
                for n in (1, 2, 3)]
    assert by_epoch[0] > 1.2 * uce and by_epoch[2] > 1.2 * uce
    assert by_epoch == sorted(by_epoch)


def test_nudity_preset_uses_the_papers_epochs_and_regularisation():
    config = make_config("rece", preset="nudity")
    assert (config.epochs, config.reg, config.keep_erased, config.preserve_bank) == (3, 0.1, False, False)


@pytest.mark.parametrize(("preset", "epochs", "reg"), [
    ("artistic style", 1, 1e-3), ("hard object", 1, 1e-3), ("easy object", 1, 1e-1), ("unsafe", 2, 1e-1)])
def test_other_presets_follow_the_readme_table(preset, epochs, reg):
    config = make_config("rece", preset=preset)
    assert (config.epochs, config.reg, config.keep_erased, config.preserve_bank) == (epochs, reg, False, False)


def test_keeping_the_erased_rows_leaves_less_of_the_targets_gap_than_the_papers_step(sites, encoder):
    """The paper's step maps only the adversarial rows and lets the target's own rows drift back;
    keep_erased holds them on the original model's anchor outputs (issue #13: RECE's r was 0.21)."""
    def gap_left(patch):
        originals, edited = _weights(sites, patch)
        left = total = 0.0
        for t in TARGETS:
            c, a = _aligned(encoder, t, ANCHOR)
            left += sum((c @ we.T - a @ w.T).pow(2).sum().item() for w, we in zip(originals, edited, strict=True))
            total += sum(((c - a) @ w.T).pow(2).sum().item() for w in originals)
        return (left / total) ** 0.5

    left = {keep: gap_left(erase("rece", sites, _concepts(), encoder,
                                 make_config("rece", keep_erased=keep, preserve_bank=False)))
            for keep in (False, True)}
    left["uce"] = gap_left(erase("uce", sites, _concepts(), encoder, make_config("uce", preserve_bank=False)))
    assert left[True] < left["uce"] < left[False]  # the paper's step gives back part of the UCE start
