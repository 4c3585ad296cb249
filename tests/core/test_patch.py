from __future__ import annotations

import os

import pytest
import torch

from erasure_core import PatchEntry, PatchError, PatchSet


def _patch(seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(2, 8, generator=g)
    return PatchSet({
        "a.to_k.weight": PatchEntry(up=torch.randn(4, 2, generator=g), down=down),
        "a.to_v.weight": PatchEntry(up=torch.randn(6, 2, generator=g), down=down),
        "b.weight": PatchEntry(diff=torch.randn(3, 3, generator=g)),
    }, {"method": "uce", "concepts": {"targets": ["x"]}})


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    patch = _patch()
    path = tmp_path / "edit.safetensors"
    patch.save(path)
    loaded = PatchSet.load(path)
    assert loaded.keys() == patch.keys() and dict(loaded.meta) == dict(patch.meta)
    for key in patch:
        for a, b in zip(patch[key].tensors(), loaded[key].tensors(), strict=True):
            assert torch.equal(a, b)


def test_scaling_composes_and_zero_is_the_identity():
    patch = _patch()
    for key in patch:
        torch.testing.assert_close(patch.scaled(2.0).scaled(0.5)[key].dense(), patch[key].dense())
        assert torch.count_nonzero(patch.scaled(0.0)[key].dense()) == 0


def test_merged_adds_per_key_and_concatenates_ranks():
    a, b = _patch(0), _patch(1)
    m = a.merged(b)
    for key in a:
        torch.testing.assert_close(m[key].dense(), a[key].dense() + b[key].dense())
    assert m["a.to_k.weight"].rank == 4


def test_restricted_keeps_only_named_keys():
    assert _patch().restricted(["b.weight", "missing"]).keys() == ["b.weight"]


@pytest.mark.parametrize("entry", [
    dict(diff=torch.tensor([[float("nan")]])),
    dict(diff=torch.zeros(3)),
    dict(up=torch.zeros(4, 2), down=torch.zeros(3, 8)),
    dict(up=torch.zeros(4, 2)),
])
def test_malformed_entries_are_refused(entry):
    with pytest.raises(PatchError):
        PatchEntry(**entry)


def test_a_file_that_is_not_a_patch_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"x.lora_up.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(PatchError, match="must be a concept-erasure patch file"):
        PatchSet.load(path)
    with pytest.raises(PatchError, match="readable .safetensors"):
        PatchSet.load(tmp_path / "missing.safetensors")


def test_a_failed_save_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "edit.safetensors"
    path.write_bytes(b"old")
    import erasure_core.edit.patch as patch_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(patch_module, "save_file", broken)
    with pytest.raises(OSError):
        _patch().save(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["edit.safetensors"]


def _deferred(seed: int = 0):
    from erasure_core.edit.patch import SharedRight

    g = torch.Generator().manual_seed(seed)
    weight, right = torch.randn(5, 4, generator=g), torch.randn(4, 4, generator=g)
    return weight, right, PatchEntry.deferred(weight.clone(), SharedRight(right))


def test_a_deferred_entry_takes_its_product_only_when_read_and_keeps_it():
    weight, right, entry = _deferred()
    assert entry.is_deferred and not entry.is_low_rank
    assert entry.shape == (5, 4) and entry.rank == 4  # shape and rank without the product
    assert entry.is_deferred
    first = entry.diff
    torch.testing.assert_close(first, weight @ right)
    assert not entry.is_deferred and entry.diff is first  # taken once, then kept
    assert entry.tensors() == (first,)  # the snapshot is released


def test_a_patch_of_deferred_entries_saves_dense_and_loads_back_equal(tmp_path):
    weight, right, entry = _deferred(1)
    patch = PatchSet({"k.weight": entry}, {"method": "uce"})
    patch.save(tmp_path / "p.safetensors")
    again = PatchSet.load(tmp_path / "p.safetensors")
    assert not again["k.weight"].is_low_rank
    assert torch.equal(again["k.weight"].diff, patch["k.weight"].diff)
    torch.testing.assert_close(patch.scaled(0.5)["k.weight"].dense(), 0.5 * (weight @ right))


def test_a_deferred_product_that_overflows_is_refused_when_read():
    from erasure_core.edit.patch import SharedRight

    entry = PatchEntry.deferred(torch.full((2, 2), 1e30), SharedRight(torch.full((2, 2), 1e30)))
    with pytest.raises(PatchError, match="overflowed"):
        _ = entry.diff


def test_entries_are_immutable():
    _, _, entry = _deferred()
    with pytest.raises(AttributeError):
        entry.diff = torch.zeros(5, 4)


def _patch_file(path, tensors=None, meta="{}"):
    from safetensors.torch import save_file

    from erasure_core.edit.patch import FORMAT_NAME, FORMAT_VERSION

    tensors = tensors if tensors is not None else {"a.weight.diff": torch.zeros(2, 2)}
    save_file(tensors, str(path), metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "meta": meta})
    return path


@pytest.mark.parametrize(("meta", "says"), [
    ("{not json", "must be valid JSON"),
    ('"x"', "must be a JSON object"),
    ("[1]", "must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "must be valid JSON, but 'it nests too deeply'"),
    (" " * (1 << 20) + "{}", "at most 1,048,576 characters"),
])
def test_a_malformed_meta_is_a_patch_error_naming_the_input_and_the_file_only(tmp_path, meta, says):
    folder = tmp_path / ("deep" * 30)
    folder.mkdir()
    path = _patch_file(folder / "p.safetensors", meta=meta)
    with pytest.raises(PatchError, match=says) as caught:
        PatchSet.load(path)
    assert caught.value.input_name == "eraser" and "patch file 'p.safetensors'" in str(caught.value)
    assert str(folder) not in str(caught.value) and len(str(caught.value)) < 400
    with pytest.raises(PatchError) as caught:
        PatchSet.load(path, input_name="patch")
    assert caught.value.input_name == "patch"


@pytest.mark.parametrize(("tensors", "says"), [
    ({"a.weight.lora_up": torch.zeros(3), "a.weight.lora_down": torch.zeros(1, 4)}, "must be 2-D"),
    ({"a.weight.bias": torch.zeros(2, 2)}, "must end with"),
    ({"a.lora_up.diff": torch.zeros(2, 2)}, "must be named"),
    ({"k" * 5000 + ".diff": torch.zeros(3)}, "must be 2-D"),
])
def test_malformed_patch_files_name_the_input_and_cut_keys(tmp_path, tensors, says):
    path = _patch_file(tmp_path / "p.safetensors", tensors)
    with pytest.raises(PatchError, match=says) as caught:
        PatchSet.load(path)
    assert caught.value.input_name == "eraser" and len(str(caught.value)) < 400


def test_an_unreadable_patch_file_names_only_the_file(tmp_path):
    path = _patch_file(tmp_path / "p.safetensors")
    path.write_bytes(path.read_bytes()[:-4])  # truncated data
    with pytest.raises(PatchError, match="'p.safetensors' must be a readable") as caught:
        PatchSet.load(path)
    assert str(tmp_path) not in str(caught.value) and caught.value.input_name == "eraser"
