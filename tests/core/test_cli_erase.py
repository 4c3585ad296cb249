"""``python -m erasure_core erase`` on a checkpoint file, without ComfyUI: a tiny SD1.5-shaped
file written at test time (safetensors and .ckpt), the LoRA it writes, its progress, its errors and
its help. The same CLI's LoRA loading in ComfyUI is tests/integration/test_cli_comfyui.py."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys

import pytest
import torch
from comfy_env import ROOT, merges_file
from safetensors import safe_open
from safetensors.torch import save_file

from erasure_core import ErasureError, erase, make_config, node_config
from erasure_core.cli import build_parser, main
from erasure_core.formats.checkpoint import open_checkpoint
from erasure_core.formats.concept_files import assemble
from erasure_core.formats.lora_out import lora_bytes
from erasure_core.text.clip import BPETokenizer

ARGS = ["--targets", "Van Gogh; Claude Monet", "--anchors", "a painter", "--preserve", "Rembrandt",
        "--token-pick", "last subject token"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import tiny_checkpoint_file

    if merges_file() is None:
        pytest.skip("no CLIP merges file (pip install open-clip-torch)")
    folder = tmp_path_factory.mktemp("ckpt")
    sd = tiny_checkpoint_file.build()
    save_file(sd, str(folder / "tiny.safetensors"))
    torch.save({"state_dict": sd, "global_step": 1}, str(folder / "tiny.ckpt"))
    return folder


def _erase(checkpoint, out, *extra, name="tiny.safetensors"):
    return main([
        "erase", str(checkpoint / name), "--out", str(out), "--merges", merges_file(), *ARGS, *extra])


def test_erase_writes_a_lora_that_works_and_says_so(checkpoint, tmp_path, capsys):
    assert _erase(checkpoint, tmp_path / "no_van_gogh") == 0
    out, err = capsys.readouterr()
    path = tmp_path / "no_van_gogh.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert len([k for k in keys if k.endswith(".lora_up.weight")]) == 14  # 7 layers x K and V
    assert meta["concept_erasure.family"] == "SD1" and meta["concept_text"] == "Van Gogh, Claude Monet"
    assert "result: the erasure WORKED" in out.splitlines()[-1]
    assert "uce: 14/14" in err and "reading" in err  # progress on stderr, report on stdout
    assert "Stable Diffusion 1.x" in out and "wrote" in out


def test_the_file_is_the_one_save_erasure_writes_for_the_same_patch(checkpoint, tmp_path, capsys):
    """Save Erasure calls lora_bytes on Closed-Form Erase's PatchSet; the CLI on its own, built by the
    same core calls from the same inputs: equal bytes. The .ckpt copy of the checkpoint, read with
    torch.load(weights_only=True), gives the same file too."""
    assert _erase(checkpoint, tmp_path / "a") == 0
    assert _erase(checkpoint, tmp_path / "b", name="tiny.ckpt") == 0
    ckpt = open_checkpoint(checkpoint / "tiny.safetensors")
    concepts = assemble(targets="Van Gogh; Claude Monet", anchors="a painter", preserve="Rembrandt")
    config, _ = node_config("uce", {"token_pick": "last subject token", "erase_scale": 1.0, "preserve_scale": 0.1,
                                    "lamb": make_config("uce").lamb, "preserve_empty_prompt": True,
                                    "solve_dtype": "float64"})  # the CLI's default λ
    patch = erase("uce", ckpt.sites(), concepts, ckpt.text_encoder(BPETokenizer(merges_file())), config)
    expected = lora_bytes(patch)[0]
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(expected).digest() == hashlib.sha256(b).digest()


def test_existing_output_is_refused_before_reading_anything(tmp_path, capsys):
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"keep me")
    code = main(["erase", str(tmp_path / "missing.safetensors"), "--out", str(out), "--targets", "x"])
    assert code == 1 and out.read_bytes() == b"keep me"
    assert "--out must name a new file unless --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ({"first_stage_model.x": torch.zeros(2)}, "UNet weights"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)},
     "text encoder"),
])
def test_checkpoints_lacking_parts_are_named(tmp_path, capsys, content, message):
    if merges_file() is None:
        pytest.skip("no CLIP merges file")
    save_file(content, str(tmp_path / "part.safetensors"))
    code = main(["erase", str(tmp_path / "part.safetensors"), "--out", str(tmp_path / "o"), "--targets", "x",
                 "--merges", merges_file()])
    assert code == 1 and message in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"demo", "erase"}
    for name, sub in subs.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"


def test_python_dash_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "erasure_core", "erase", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert "CHECKPOINT" in run.stdout and "--dense-as" in run.stdout and "--precision" in run.stdout


def test_checkpoint_file_errors_blame_the_checkpoint_also_when_a_tensor_is_read(tmp_path):
    import tiny_checkpoint_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ErasureError) as err:
        open_checkpoint(tmp_path / "junk.safetensors")
    assert err.value.input_name == "checkpoint" and "eraser" not in err.value.message
    sd = {k: v for k, v in tiny_checkpoint_file.build().items() if k.startswith("model.diffusion_model.")}
    key = next(k for k in sd if "attn2.to_k" in k)
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(tmp_path / "nan.safetensors"))
    ckpt = open_checkpoint(tmp_path / "nan.safetensors")
    with pytest.raises(ErasureError, match="checkpoint file 'nan.safetensors' must hold finite weights") as err:
        ckpt.file[key]
    assert err.value.input_name == "checkpoint" and "eraser" not in err.value.message
