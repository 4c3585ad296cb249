"""SPM files in the released format, the architecture check, and the two ways to combine membranes
(checked on the effective weight changes)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from erasure_core.errors import ArchitectureError, ConceptError, ConfigError, PatchError
from erasure_core.formats.spm import (
    load_spm_file,
    parse_spm,
    resolve_keys,
    split_prompts,
)
from erasure_core.gating.spm_combine import PAPER, REFERENCE, combine

# Two modules as in a released SD1.x SPM: a 1x1 conv (proj_in) and a linear (attn2.to_k).
CONV = "lora_unet_down_blocks_0_attentions_0_proj_in"
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
MODEL_KEYS = {CONV: "diffusion_model.input_blocks.1.1.proj_in.weight",
              LINEAR: "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"}
SHAPES = {MODEL_KEYS[CONV]: (6, 6, 1, 1), MODEL_KEYS[LINEAR]: (6, 10)}


def spm_tensors(seed: int, rank: int = 1, alpha: float = 1.0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The released key layout: lora_down / lora_up / alpha per module, 1x1 conv factors 4-D."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{CONV}.lora_down.weight": torch.randn(rank, 6, 1, 1, generator=g).to(dtype),
        f"{CONV}.lora_up.weight": torch.randn(6, rank, 1, 1, generator=g).to(dtype),
        f"{CONV}.alpha": torch.tensor(alpha).to(dtype),
        f"{LINEAR}.lora_down.weight": torch.randn(rank, 10, generator=g).to(dtype),
        f"{LINEAR}.lora_up.weight": torch.randn(6, rank, generator=g).to(dtype),
        f"{LINEAR}.alpha": torch.tensor(alpha).to(dtype),
    }


def write_spm(path, seed=0, prompts="snoopy", rank=1, alpha=1.0):
    metadata = {"rank": str(rank), "alpha": str(alpha)}
    if prompts is not None:
        metadata["prompts"] = prompts
    save_file(spm_tensors(seed, rank, alpha), str(path), metadata)
    return str(path)


def delta(factors, name):
    up, down = factors[name]
    return up @ down


def module_delta(spm, name):
    m = spm.modules[name]
    up, down = m.factors()
    return m.scale * up @ down


def test_a_released_format_file_loads_with_prompts_rank_alpha_and_scale(tmp_path):
    path = write_spm(tmp_path / "snoopy.safetensors", prompts="snoopy, snoopy dog,", rank=1, alpha=1.0)
    spm = load_spm_file(path)
    assert spm.name == "snoopy.safetensors" and spm.is_spm
    assert spm.prompts == ("snoopy", "snoopy dog")
    assert set(spm.modules) == {CONV, LINEAR}
    conv = spm.modules[CONV]
    assert conv.rank == 1 and conv.alpha == 1.0 and conv.scale == 1.0
    assert conv.down.dtype == torch.float32 and conv.factors()[1].shape == (1, 6)
    assert spm.rank == 1 and spm.reference_scale == 1.0
    raw = spm_tensors(0)
    assert torch.equal(conv.up, raw[f"{CONV}.lora_up.weight"].float())


def test_alpha_over_rank_scales_each_module(tmp_path):
    spm = load_spm_file(write_spm(tmp_path / "r4.safetensors", rank=4, alpha=2.0))
    assert spm.modules[LINEAR].scale == pytest.approx(0.5)
    assert spm.reference_scale == pytest.approx(0.5)
    out = combine([spm], [1.0], PAPER)
    torch.testing.assert_close(delta(out, LINEAR), module_delta(spm, LINEAR))
    # alpha 0 or missing means no scaling (kohya and the SPM layer agree)
    no_alpha = {k: v for k, v in spm_tensors(0).items() if not k.endswith(".alpha")}
    assert parse_spm(no_alpha, {}, "x").modules[LINEAR].scale == 1.0


def test_a_plain_lora_without_prompts_is_recognised(tmp_path):
    spm = load_spm_file(write_spm(tmp_path / "plain.safetensors", prompts=None))
    assert not spm.is_spm and spm.prompts == ()
    assert split_prompts(" , ") == ()


def test_text_encoder_keys_are_skipped_and_listed():
    sd = spm_tensors(0) | {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 4)}
    assert parse_spm(sd, {"prompts": "x"}, "x").ignored == ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",)


@pytest.mark.parametrize(("extra", "match"), [
    ({f"{LINEAR}.hada_w1_a": torch.zeros(1, 1)}, "hada_w1_a"),
    ({"lora_unet_x.lora_up.weight": torch.zeros(6, 1)}, "lora_down.weight' is missing"),
    ({"lora_unet_y.lora_up.weight": torch.zeros(6, 2), "lora_unet_y.lora_down.weight": torch.zeros(1, 4)},
     "matching LoRA factors"),
])
def test_malformed_files_are_refused_naming_the_key(extra, match):
    with pytest.raises(PatchError, match=match) as err:
        parse_spm(spm_tensors(0) | extra, {}, "bad.safetensors", input_name="spm_1")
    assert err.value.input_name == "spm_1" and "bad.safetensors" in str(err.value)


def test_non_safetensors_and_unreadable_files_are_refused(tmp_path):
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(PatchError, match="safetensors"):
        load_spm_file(str(pt))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(PatchError, match="readable"):
        load_spm_file(str(broken))


def test_keys_resolve_and_an_architecture_mismatch_names_the_first_offending_key(tmp_path):
    spm = load_spm_file(write_spm(tmp_path / "a.safetensors"))
    assert resolve_keys(spm, MODEL_KEYS, SHAPES) == MODEL_KEYS
    with pytest.raises(ArchitectureError, match=f"'{CONV}' matches no weight") as err:
        resolve_keys(spm, {LINEAR: MODEL_KEYS[LINEAR]}, SHAPES, input_name="spm_2")
    assert err.value.input_name == "spm_2"
    wider = SHAPES | {MODEL_KEYS[LINEAR]: (6, 2048)}  # SDXL-width context
    with pytest.raises(ArchitectureError, match="6x10 while the model's"):
        resolve_keys(spm, MODEL_KEYS, wider)


def test_paper_mode_is_linear_in_each_multiplier(tmp_path):
    a = load_spm_file(write_spm(tmp_path / "a.safetensors", seed=1))
    b = load_spm_file(write_spm(tmp_path / "b.safetensors", seed=2, rank=2, alpha=1.0))
    for name in (CONV, LINEAR):
        one = delta(combine([a], [0.6], PAPER), name)
        torch.testing.assert_close(one, 0.6 * module_delta(a, name))
        both = delta(combine([a, b], [0.6, 0.3], PAPER), name)
        torch.testing.assert_close(both, 0.6 * module_delta(a, name) + 0.3 * module_delta(b, name))
    assert combine([a, b], [0.0, 0.0], PAPER) == {}
    up, down = combine([a, b], [0.6, 0.3], PAPER)[LINEAR]
    assert up.shape == (6, 3) and down.shape == (3, 10)  # exact: ranks concatenated


def test_reference_mode_squares_one_multiplier_and_multiplies_sums(tmp_path):
    a = load_spm_file(write_spm(tmp_path / "a.safetensors", seed=1))
    b = load_spm_file(write_spm(tmp_path / "b.safetensors", seed=2))
    for name in (CONV, LINEAR):
        torch.testing.assert_close(delta(combine([a], [0.6], REFERENCE), name), 0.36 * module_delta(a, name))
        ua, da = a.modules[name].factors()
        ub, db = b.modules[name].factors()
        expected = (0.6 * ua + 0.3 * ub) @ (0.6 * da + 0.3 * db)
        got = delta(combine([a, b], [0.6, 0.3], REFERENCE), name)
        torch.testing.assert_close(got, expected)
        # not the paper's sum: the cross terms are there
        paper = delta(combine([a, b], [0.6, 0.3], PAPER), name)
        assert not torch.allclose(got, paper)
        torch.testing.assert_close(got - 0.36 * ua @ da - 0.09 * ub @ db, 0.18 * (ua @ db + ub @ da))


def test_reference_mode_uses_the_first_files_metadata_scale_and_needs_equal_layouts(tmp_path):
    a = load_spm_file(write_spm(tmp_path / "a.safetensors", seed=1, rank=2, alpha=1.0))
    ua, da = a.modules[LINEAR].factors()
    torch.testing.assert_close(delta(combine([a], [1.0], REFERENCE), LINEAR), 0.5 * ua @ da)
    b = load_spm_file(write_spm(tmp_path / "b.safetensors", seed=2, rank=1))
    with pytest.raises(ConceptError, match="same modules and rank"):
        combine([a, b], [1.0, 1.0], REFERENCE)


def test_combine_refuses_bad_arguments(tmp_path):
    a = load_spm_file(write_spm(tmp_path / "a.safetensors"))
    with pytest.raises(ConfigError, match="combination"):
        combine([a], [1.0], "sum")
    with pytest.raises(ConfigError, match="one multiplier per SPM"):
        combine([a], [1.0, 2.0], PAPER)


class _CountingOpen:
    """``safetensors.safe_open`` that records which tensors were read."""

    read: list[str] = []

    def __init__(self, *args, **kwargs):
        self._inner = _CountingOpen.real(*args, **kwargs)

    def __enter__(self):
        self._file = self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def get_tensor(self, key):
        _CountingOpen.read.append(key)
        return self._file.get_tensor(key)


@pytest.fixture
def counting_open(monkeypatch):
    import safetensors

    _CountingOpen.real = safetensors.safe_open
    _CountingOpen.read = []
    monkeypatch.setattr(safetensors, "safe_open", _CountingOpen)
    return _CountingOpen


def test_a_file_that_is_not_an_spm_is_refused_before_any_tensor_is_read(tmp_path, counting_open):
    """The SPM slots list every LoRA: a checkpoint picked there was read whole before the refusal."""
    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(256, 256),
               **spm_tensors(0)}, str(path))
    with pytest.raises(PatchError, match="'model.diffusion_model.input_blocks.0.0.weight'"):
        load_spm_file(str(path), input_name="spm_2")
    bad_rank = tmp_path / "mismatch.safetensors"
    save_file(spm_tensors(0) | {"lora_unet_y.lora_up.weight": torch.zeros(6, 2),
                                "lora_unet_y.lora_down.weight": torch.zeros(1, 4)}, str(bad_rank))
    with pytest.raises(PatchError, match="matching LoRA factors"):
        load_spm_file(str(bad_rank))
    assert counting_open.read == []


def test_only_the_unet_tensors_are_read(tmp_path, counting_open):
    path = tmp_path / "with_te.safetensors"
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    save_file(spm_tensors(0) | {te: torch.zeros(1, 4)}, str(path), {"prompts": "snoopy"})
    spm = load_spm_file(str(path))
    assert spm.ignored == (te,) and sorted(counting_open.read) == sorted(spm_tensors(0))


@pytest.mark.parametrize("metadata", [{"alpha": " " * 10**6 + "nan"}, {"rank": " " * 10**6 + "inf"},
                                      {"rank": " " * 10**6 + "0"}])
def test_bad_metadata_and_long_keys_are_quoted_cut(metadata):
    with pytest.raises(PatchError, match="metadata") as err:
        parse_spm(spm_tensors(0), metadata, "bad.safetensors", input_name="spm_1")
    assert err.value.input_name == "spm_1" and len(str(err.value)) < 400
    long_key = "lora_unet_" + "x" * 10**6 + ".hada_w1_a"
    with pytest.raises(PatchError, match="but it has the key 'lora_unet_xxx") as err:
        parse_spm(spm_tensors(0) | {long_key: torch.zeros(1)}, {}, "bad.safetensors")
    assert len(str(err.value)) < 500
