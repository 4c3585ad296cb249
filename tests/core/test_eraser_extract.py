"""Weight differences (changed weights only, shape errors naming the key) and low-rank
extraction: exact on a known low-rank difference, the Eckart-Young error on a full-rank one,
conv kernels and biases flattened, and a saved file that loads back."""

from __future__ import annotations

import pytest
import torch

from erasure_core import ConfigError, ErasureError, PatchSet
from erasure_core.edit.extract import KeyPart, extract_low_rank, fused_pairs, rounding_tolerance, weight_differences


def test_exact_low_rank_difference_is_recovered_at_its_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(320, 3, generator=g) @ torch.randn(3, 768, generator=g)
    patch, report = extract_low_rank({"k": delta}, max_rank=64, max_error=1e-4)
    assert patch["k"].rank == 3 and report.fits[0].rel_error < 1e-6
    torch.testing.assert_close(patch["k"].dense(), delta, rtol=0, atol=1e-4)


def test_error_bound_and_rank_cap_follow_the_singular_values():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 32, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 32, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, 32, dtype=torch.float64)
    delta = (u * s @ v.T).float()
    patch, report = extract_low_rank({"k": delta}, max_rank=64, max_error=0.05)
    r = patch["k"].rank
    tail = lambda k: float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())  # noqa: E731
    assert tail(r) <= 0.05 < tail(r - 1)  # the smallest rank meeting the bound
    err = float((patch["k"].dense() - delta).norm() / delta.norm())
    assert abs(err - report.fits[0].rel_error) < 1e-4 and err <= 0.05 + 1e-5
    capped, report = extract_low_rank({"k": delta}, max_rank=2, max_error=0.0)
    assert capped["k"].rank == 2 and abs(report.fits[0].rel_error - tail(2)) < 1e-5


def test_conv_and_bias_are_flattened_and_recorded(tmp_path):
    conv, bias = torch.randn(8, 4, 3, 3), torch.randn(8)
    patch, report = extract_low_rank({"conv.weight": conv, "conv.bias": bias, "zero": torch.zeros(3, 3)},
                                     max_rank=64, max_error=0.0, meta={"concept_text": "x"})
    assert patch["conv.weight"].shape == (8, 36) and patch["conv.bias"].shape == (8, 1)
    torch.testing.assert_close(patch["conv.weight"].dense().reshape(conv.shape), conv, rtol=0, atol=1e-5)
    assert "zero" not in patch and patch.meta["weight_shapes"] == {"conv.weight": [8, 4, 3, 3], "conv.bias": [8]}
    patch.save(tmp_path / "e.safetensors")
    back = PatchSet.load(tmp_path / "e.safetensors")
    assert back.meta["concept_text"] == "x" and back.meta["fits"]["conv.weight"][0] == 8
    assert "2 weights" in report.summary()
    with pytest.raises(ConfigError):
        extract_low_rank({"k": conv}, max_rank=0)


def test_weight_differences_keep_changed_weights_and_name_shape_mismatch():
    model = {"a": torch.randn(4, 4), "b": torch.randn(4, 4), "c": torch.randn(4, 4)}
    file = {"a": model["a"].half().float(), "b": model["b"] + 0.1, "ids": torch.arange(3), "c": torch.zeros(2, 2)}
    diff = weight_differences([("a", "a"), ("b", "b"), ("ids", "a")], file.__getitem__, model.__getitem__,
                              {k: tuple(v.shape) for k, v in model.items()},
                              model_dtype=lambda k: torch.float16)
    assert list(diff.deltas) == ["b"] and diff.unchanged == 1 and diff.skipped == ("ids",)
    torch.testing.assert_close(diff.deltas["b"], torch.full((4, 4), 0.1), rtol=0, atol=1e-6)
    with pytest.raises(ErasureError, match=r"'c' is \(2, 2\) and the model's 'c' is \(4, 4\)"):
        weight_differences([("c", "c")], file.__getitem__, model.__getitem__, {"c": (4, 4)})
    assert rounding_tolerance(torch.float16, torch.float32) == 4 * torch.finfo(torch.float16).eps


def test_randomized_path_on_wide_weights_finds_the_rank_and_measures_the_error():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(640, 5, generator=g) @ torch.randn(5, 768, generator=g)
    noise = torch.randn(640, 768, generator=g)
    delta = low + noise / noise.norm() * low.norm() * 1e-3
    patch, report = extract_low_rank({"k": delta}, max_rank=8, max_error=0.01)  # 16 < 640/2: randomized
    assert patch["k"].rank == 5
    measured = float((patch["k"].dense() - delta).norm() / delta.norm())
    assert abs(measured - report.fits[0].rel_error) < 1e-5 and measured < 2e-3
    again, _ = extract_low_rank({"k": delta}, max_rank=8, max_error=0.01)
    assert torch.equal(again["k"].up, patch["k"].up)  # seeded: the same file every time


def test_fused_parts_are_assembled_into_their_weight_and_missing_rows_keep_the_models():
    """A file that splits a fused weight (diffusers' q/k/v of Flux's qkv): each part lands on its rows,
    after its transform; rows the file lacks read as the model's, so only the changed part differs."""
    gen = torch.Generator().manual_seed(0)
    model = {"qkv": torch.randn(6, 4, generator=gen), "mod": torch.randn(4, 3, generator=gen)}
    file = {"to_q": model["qkv"][0:2].clone(), "to_k": model["qkv"][2:4] + 1.0,
            "norm_out": torch.cat([model["mod"][2:], model["mod"][:2]])}  # halves swapped, as diffusers stores it
    swap = lambda t: torch.cat([t[t.shape[0] // 2:], t[: t.shape[0] // 2]])  # noqa: E731
    parts = {"to_q": KeyPart("qkv", 0, 0, 2), "to_k": KeyPart("qkv", 0, 2, 2), "norm_out": KeyPart("mod", transform=swap)}
    shapes = {k: tuple(v.shape) for k, v in model.items()}
    pairs, read = fused_pairs(parts, file.__getitem__, model.__getitem__, shapes)
    assert sorted(pairs) == [("mod", "mod"), ("qkv", "qkv")]
    diff = weight_differences(pairs, read, model.__getitem__, shapes)
    assert set(diff.deltas) == {"qkv"} and diff.unchanged == 1
    expected = torch.zeros(6, 4)
    expected[2:4] = 1.0
    torch.testing.assert_close(diff.deltas["qkv"], expected)


def test_a_fused_part_past_its_weight_is_refused_naming_it():
    model = {"qkv": torch.zeros(6, 4)}
    with pytest.raises(ErasureError, match="'proj_mlp' goes to rows 4-12 of 'qkv'"):
        fused_pairs({"proj_mlp": KeyPart("qkv", 0, 4, 8)}, model.__getitem__, model.__getitem__, {"qkv": (6, 4)})
    _, read = fused_pairs({"to_v": KeyPart("qkv", 0, 4, 2)}, {"to_v": torch.zeros(3, 4)}.__getitem__,
                          model.__getitem__, {"qkv": (6, 4)})
    with pytest.raises(ErasureError, match="'to_v' is \\(3, 4\\)"):
        read("qkv")


def test_shape_refusals_blame_the_input_they_are_told():
    model = {"qkv": torch.zeros(6, 4)}
    file = {"to_v": torch.zeros(3, 4)}
    calls = (lambda **kw: weight_differences([("to_v", "qkv")], file.__getitem__, model.__getitem__, {"qkv": (6, 4)},
                                             **kw),
             lambda **kw: fused_pairs({"p": KeyPart("qkv", 0, 4, 8)}, model.__getitem__, model.__getitem__,
                                      {"qkv": (6, 4)}, **kw),
             lambda **kw: fused_pairs({"to_v": KeyPart("qkv", 0, 4, 2)}, file.__getitem__, model.__getitem__,
                                      {"qkv": (6, 4)}, **kw)[1]("qkv"))
    for call in calls:
        with pytest.raises(ErasureError) as default:
            call()
        assert default.value.input_name == "eraser" and default.value.message.startswith("eraser weights must")
        with pytest.raises(ErasureError) as named:
            call(input_name="erased_model")
        assert named.value.input_name == "erased_model", named.value
        assert named.value.message.startswith("erased_model weights must") and "eraser" not in named.value.message
