"""Reading eraser files: safetensors lazily, torch pickles only as plain tensors (a pickle that
would run code is refused with a clear message), Receler's folder and config, wrapped dicts."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from fakes import Payload
from safetensors.torch import save_file

from erasure_core import ErasureError
from erasure_core.formats.eraser_files import open_eraser


def test_safetensors_header_only_until_a_tensor_is_read(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    save_file({"a.weight": torch.ones(3, 4), "b.weight": torch.zeros(2)}, str(path), {"prompts": "snoopy"})
    f = open_eraser(path)
    assert f.shapes == {"a.weight": (3, 4), "b.weight": (2,)} and f.metadata["prompts"] == "snoopy"
    assert f._tensors is None  # nothing loaded yet
    assert torch.equal(f["a.weight"], torch.ones(3, 4))


def test_pickle_with_code_is_refused_without_fallback(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "p": Payload()}, path)
    calls = []
    # pickle finds os.system as posix.system (nt.system on Windows): patch it where a full load would look
    monkeypatch.setattr(sys.modules[os.system.__module__], "system", lambda cmd: calls.append(cmd))
    before = path.read_bytes()
    with pytest.raises(ErasureError, match=r"evil\.pt.*weights_only=True.*never as a full pickle.*Nothing was loaded"):
        open_eraser(path)
    assert calls == [] and path.read_bytes() == before


def test_plain_tensor_pickles_and_wrappers_are_read(tmp_path):
    torch.save({"state_dict": {"x.weight": torch.ones(2, 2)}}, tmp_path / "wrapped.ckpt")
    f = open_eraser(tmp_path / "wrapped.ckpt")
    assert list(f) == ["x.weight"]
    torch.save({"a": {"b": torch.zeros(1)}, "epoch": 3}, tmp_path / "nested.pt")
    f = open_eraser(tmp_path / "nested.pt")
    assert list(f) == ["a.b"] and f.metadata == {"epoch": "3"}


def test_receler_folder_and_config(tmp_path):
    torch.save({"down_blocks.0.attentions.0": {"down.weight": torch.zeros(4, 320), "down.bias": torch.zeros(4),
                                               "up.weight": torch.zeros(320, 4), "up.bias": torch.zeros(320)}},
               tmp_path / "eraser_weights.pt")
    (tmp_path / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": 4}))
    f = open_eraser(tmp_path)  # the folder itself
    assert f.config == {"eraser_type": "adapter", "eraser_rank": 4}
    assert "down_blocks.0.attentions.0.down.weight" in f.shapes


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(ErasureError, match="must exist"):
        open_eraser(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ErasureError, match="readable safetensors"):
        open_eraser(tmp_path / "junk.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ErasureError, match="must end with"):
        open_eraser(tmp_path / "x.onnx")
    torch.save({"n": 1}, tmp_path / "empty.pt")
    with pytest.raises(ErasureError, match="holds none"):
        open_eraser(tmp_path / "empty.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eraser_weights.pt").write_bytes(b"")
    (tmp_path / "bad" / "eraser_config.json").write_text("{")
    with pytest.raises(ErasureError):
        open_eraser(tmp_path / "bad")


def test_errors_name_the_input_the_file_was_picked_in(tmp_path):
    """Apply Eraser LoRA's 'eraser' by default; another node's input (Extract Eraser's 'erased_file')
    when told, in the error's input_name and its words, also for tensors read later."""
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"w": torch.zeros(2), "p": Payload()}, tmp_path / "evil.pt")
    (tmp_path / "x.onnx").write_bytes(b"")
    for name in ("junk.safetensors", "evil.pt", "x.onnx", "missing.pt"):
        with pytest.raises(ErasureError) as default:
            open_eraser(tmp_path / name)
        assert default.value.input_name == "eraser" and "eraser file" in default.value.message
        with pytest.raises(ErasureError) as named:
            open_eraser(tmp_path / name, input_name="erased_file")
        assert named.value.input_name == "erased_file", named.value
        assert named.value.message.startswith("erased_file ") and "eraser file" not in named.value.message
    save_file({"w": torch.tensor([float("nan")]), "e": torch.zeros(0, 3)}, str(tmp_path / "bad.safetensors"))
    f = open_eraser(tmp_path / "bad.safetensors", input_name="erased_file")
    for key, words in (("w", "erased_file 'bad.safetensors' must hold finite weights"),
                       ("e", "erased_file 'bad.safetensors' must hold non-empty weights")):
        with pytest.raises(ErasureError, match=words) as err:
            f[key]
        assert err.value.input_name == "erased_file"
    with pytest.raises(ErasureError, match="eraser file 'bad.safetensors' must hold finite") as err:
        open_eraser(tmp_path / "bad.safetensors")["w"]
    assert err.value.input_name == "eraser"


def _receler(folder):
    folder.mkdir()
    save_file({"down_blocks.0.attentions.0.down.weight": torch.zeros(4, 320),
               "down_blocks.0.attentions.0.down.bias": torch.zeros(4),
               "down_blocks.0.attentions.0.up.weight": torch.zeros(320, 4),
               "down_blocks.0.attentions.0.up.bias": torch.zeros(320)}, str(folder / "eraser_weights.safetensors"))
    return folder / "eraser_weights.safetensors"


def test_the_sidecar_config_is_read_only_beside_receler_weights(tmp_path):
    """A broken eraser_config.json beside an ordinary eraser is not read (every file of a folder
    would otherwise read it at queue time); beside Receler weights it is, and refused clearly."""
    save_file({"model.diffusion_model.x.weight": torch.zeros(2, 2)}, str(tmp_path / "esd.safetensors"))
    (tmp_path / "eraser_config.json").write_text("[" * 100_000)
    assert open_eraser(tmp_path / "esd.safetensors").config == {}
    weights = _receler(tmp_path / "rec")
    (tmp_path / "rec" / "eraser_config.json").write_text("[" * 30_000 + "]" * 30_000)  # RecursionError before
    with pytest.raises(ErasureError, match="must be valid JSON, but reading it failed \\('it nests too deeply'\\)") as err:
        open_eraser(weights)
    assert err.value.input_name == "eraser"
    (tmp_path / "rec" / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "pad": "x" * 70_000}))
    with pytest.raises(ErasureError, match="must be at most 64 KiB") as err:
        open_eraser(weights, input_name="erased_file")
    assert err.value.input_name == "erased_file"
    (tmp_path / "rec" / "eraser_config.json").write_text(json.dumps({"eraser_type": "adapter", "eraser_rank": 4}))
    assert open_eraser(weights).config == {"eraser_type": "adapter", "eraser_rank": 4}


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_a_sidecar_config_linking_outside_the_erasers_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"eraser_type": "adapter", "token": "s3cr3t"}))
    weights = _receler(tmp_path / "rec")
    os.symlink(secret, tmp_path / "rec" / "eraser_config.json")
    with pytest.raises(ErasureError, match="must be a file in the eraser's own folder, but it links outside it"):
        open_eraser(weights)
    os.remove(tmp_path / "rec" / "eraser_config.json")
    (tmp_path / "rec" / "real.json").write_text(json.dumps({"eraser_type": "adapter"}))
    os.symlink(tmp_path / "rec" / "real.json", tmp_path / "rec" / "eraser_config.json")  # inside: fine
    assert open_eraser(weights).config == {"eraser_type": "adapter"}
