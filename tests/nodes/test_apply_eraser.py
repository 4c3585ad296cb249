"""Apply Eraser LoRA and Extract Eraser on a FakePatcher and a FakeClip under the stubbed ComfyUI:
files from the registered folder, effective weights, the gate, refusals naming the node.
(Formats whose mapping needs ComfyUI's own key maps, LoRAs, Receler and diffusers names, are
tested against the real ComfyUI in tests/integration/test_eraser_comfyui.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from comfy_stubs import FakeClip, FakePatcher, sd1_weights, site_key
from fakes import Payload
from safetensors.torch import save_file

K = site_key("input_blocks.1.1", "k")
V = site_key("output_blocks.3.1", "v")


def run(env, model, eraser, clip=None, **options):
    node = env.pack.nodes.apply_eraser.ApplyEraserLoRA
    return node.execute(model=model, clip=clip, eraser=eraser, strength=options.pop("strength", 1.0), **options)


def effective(env, model, key):
    (base, _), *patches = model.get_key_patches()[key]
    return env.calculate_weight(patches, base.float().clone(), key)


def test_ldm_weights_as_diff_patches_on_a_clone(stub_env, erasers):
    weights = sd1_weights()
    model = FakePatcher(weights)
    delta = torch.full(weights[K].shape, 0.01)
    save_file({"model." + K: weights[K] + delta, "model." + V: weights[V].clone()}, str(erasers / "esd.safetensors"))
    out = run(stub_env, model, "esd.safetensors", strength=0.5)
    patched, clip, report = out.result
    assert patched is not model and model.patches == {} and clip is None
    torch.testing.assert_close(effective(stub_env, patched, K), weights[K] + 0.5 * delta)
    assert list(patched.patches) == [K] and "1 of 2 UNet weights differ" in report
    assert report in out.ui["text"][0] and "LDM names" in report


def test_gate_leaves_an_unrelated_prompt_unchanged(stub_env, erasers):
    weights = sd1_weights()
    model = FakePatcher(weights)
    save_file({"model." + K: weights[K] + 0.01}, str(erasers / "gated.safetensors"),
              metadata={"concept_text": "snoopy"})
    gate = {"gate": "facilitated transport", "gate_threshold": 0.99, "clip": FakeClip()}
    unrelated, _, report = run(stub_env, model, "gated.safetensors", prompt="a bowl of ramen", **gate).result
    assert unrelated is model and "gate 0.000" in report
    out = run(stub_env, model, "gated.safetensors", prompt="snoopy", **gate)
    related, _, report = out.result
    torch.testing.assert_close(effective(stub_env, related, K), weights[K] + 0.01)
    assert "gate 1.000" in report
    payload = out.ui["ce_report"][0]
    assert payload["bars"] == [{"label": "gate", "value": 1.0, "limit": 1.0, "good": "high", "text": "1.000 -> x1.000"}]
    assert payload["lines"][1].startswith("applied ") and "gate 1.000" in " ".join(payload["lines"])


def test_gate_needs_a_prompt_and_a_concept(stub_env, erasers):
    weights = sd1_weights()
    save_file({"model." + K: weights[K] + 0.01}, str(erasers / "plain.safetensors"))
    err = stub_env.core.ErasureError
    with pytest.raises(err, match="Apply Eraser LoRA, input 'prompt'"):
        run(stub_env, FakePatcher(weights), "plain.safetensors", gate="facilitated transport", clip=FakeClip())
    with pytest.raises(err, match="input 'concept_text'"):
        run(stub_env, FakePatcher(weights), "plain.safetensors", gate="facilitated transport", clip=FakeClip(),
            prompt="a cat")


def test_refusals_name_the_node_and_change_nothing(stub_env, erasers):
    weights = sd1_weights()
    model = FakePatcher(weights)
    snapshot = {k: v.clone() for k, v in weights.items()}
    torch.save({"model." + K: weights[K], "x": Payload()}, erasers / "evil.pt")
    err = stub_env.core.ErasureError
    with pytest.raises(err, match=r"Apply Eraser LoRA, input 'eraser': eraser file 'evil\.pt' must hold only tensors"):
        run(stub_env, model, "evil.pt")
    with pytest.raises(err, match="inside models/erasers|one of the listed values"):
        run(stub_env, model, "../outside.safetensors")
    save_file({"vae.decoder.conv.weight": torch.zeros(2, 2)}, str(erasers / "odd.safetensors"))
    with pytest.raises(err, match=r"match none of them\. Found: 1x vae\.decoder\.conv\.weight"):
        run(stub_env, model, "odd.safetensors")
    save_file({"model." + K: torch.zeros(8, 1024)}, str(erasers / "sd2.safetensors"))
    with pytest.raises(err, match=r"'model\..*to_k\.weight' is \(8, 1024\)"):
        run(stub_env, model, "sd2.safetensors")
    assert model.patches == {} and all(torch.equal(weights[k], snapshot[k]) for k in weights)


def test_extract_from_an_erased_model_then_apply_the_file(stub_env, erasers):
    weights = sd1_weights()
    model = FakePatcher(weights)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(8, 2, generator=g) @ torch.randn(2, 768, generator=g) * 0.01
    erased = FakePatcher({k: (v + low if k == K else v.clone()) for k, v in weights.items()})
    node = stub_env.pack.nodes.extract_eraser.ExtractEraser
    patched, report = node.execute(model=model, erased_file="none", max_rank=8, max_error=0.01, filename="mine",
                                   concept_text="snoopy", erased_model=erased).result
    assert (erasers / "mine.safetensors").is_file() and "1 of" in report and "rank 2-2" in report
    torch.testing.assert_close(effective(stub_env, patched, K), weights[K] + low, rtol=0, atol=1e-5)
    again, _, report = run(stub_env, model, "mine.safetensors").result
    torch.testing.assert_close(effective(stub_env, again, K), weights[K] + low, rtol=0, atol=1e-5)
    assert "concept-erasure patch" in report and "rank 2" in report
    with pytest.raises(stub_env.core.ErasureError, match="Extract Eraser, input 'erased_file'"):
        node.execute(model=model, erased_file="none", max_rank=8, max_error=0.01, filename="x")
    with pytest.raises(stub_env.core.ErasureError, match="input 'filename'"):
        node.execute(model=model, erased_file="none", max_rank=8, max_error=0.01, filename="../x",
                     erased_model=erased)


def test_choices_list_erasers_and_loras(stub_env, erasers, model_folder):
    (erasers / "a.safetensors").write_bytes(b"")
    (erasers / "rec").mkdir()
    (erasers / "rec" / "eraser_weights.pt").write_bytes(b"")
    loras = model_folder(stub_env.comfy["folder_paths"], "loras", {".safetensors"})
    (loras / "l.safetensors").write_bytes(b"")
    assert stub_env.pack.nodes._comfy.eraser_choices() == ["none", "a.safetensors", "rec/eraser_weights.pt",
                                                           "loras/l.safetensors"]


def test_queue_time_validation(stub_env, erasers):
    node = stub_env.pack.nodes.apply_eraser.ApplyEraserLoRA
    save_file({"vae.decoder.conv.weight": torch.zeros(2, 2)}, str(erasers / "odd.safetensors"))
    save_file({"model." + K: torch.zeros(8, 768)}, str(erasers / "ok.safetensors"))
    assert node.validate_inputs(eraser="ok.safetensors") is True
    assert node.validate_inputs(eraser=None) is True
    message = node.validate_inputs(eraser="odd.safetensors")
    assert message.startswith("Apply Eraser LoRA, input 'eraser'") and "vae.decoder" in message
    assert "inside models/erasers" in node.validate_inputs(eraser="none")


def test_extraction_stops_on_cancel_and_writes_nothing(stub_env, erasers):
    weights = sd1_weights()
    erased = FakePatcher({k: v + 0.01 for k, v in weights.items()})
    mm = stub_env.comfy["comfy.model_management"]
    mm.interrupt_processing = True
    node = stub_env.pack.nodes.extract_eraser.ExtractEraser
    with pytest.raises(mm.InterruptProcessingException):
        node.execute(model=FakePatcher(weights), erased_file="none", max_rank=8, max_error=0.01, filename="cut",
                     erased_model=erased)
    assert not (erasers / "cut.safetensors").exists() and os.listdir(erasers) == []


def test_gate_concepts_are_deduplicated_limited_and_encoded_in_chunks(stub_env, erasers):
    weights = sd1_weights()
    model = FakePatcher(weights)
    many = ", ".join(f"concept{i}" for i in range(2000))
    save_file({"model." + K: weights[K] + 0.01}, str(erasers / "many.safetensors"), metadata={"concept_text": many})
    save_file({"model." + K: weights[K] + 0.01}, str(erasers / "forty.safetensors"),
              metadata={"concept_text": ", ".join(f"concept{i}" for i in range(40))})
    node = stub_env.pack.nodes.apply_eraser.ApplyEraserLoRA
    clip = FakeClip()
    gate = {"gate": "facilitated transport", "clip": clip, "prompt": "a photo of concept3"}
    err = stub_env.core.ConceptError
    with pytest.raises(err, match=r"at most 1,024, but the metadata of eraser 'many\.safetensors' lists 2,000 "
                                  r"distinct concepts \('concept0', .* and 1,995 more\)\. Type the concepts") as info:
        run(stub_env, model, "many.safetensors", **gate)
    assert info.value.input_name == "eraser" and len(str(info.value)) < 400
    with pytest.raises(err, match="concept_text lists 2,000 distinct") as info:
        run(stub_env, model, "forty.safetensors", concept_text=many, **gate)
    assert info.value.input_name == "concept_text"
    assert clip.encoded_windows == [] and model.patches == {}  # refused before any encoding
    message = node.validate_inputs(eraser="many.safetensors", gate="facilitated transport", concept_text="")
    assert message.startswith("Apply Eraser LoRA, input 'eraser'") and "1,024" in message
    assert node.validate_inputs(eraser="many.safetensors", gate="off", concept_text="") is True
    assert node.validate_inputs(eraser="many.safetensors", gate="facilitated transport", concept_text="snoopy") is True
    assert "input 'concept_text'" in node.validate_inputs(eraser=None, gate="facilitated transport", concept_text=many)
    # a typed list replaces the file's; duplicates are encoded once
    _, _, report = run(stub_env, model, "many.safetensors", concept_text="concept3, " * 5000, **gate).result
    assert clip.encoded_windows == [2] and "gate 1.000" in report
    clip.encoded_windows.clear()
    out = run(stub_env, model, "forty.safetensors", **gate)  # the prompt + 40 concepts: two CLIP calls
    assert clip.encoded_windows == [32, 9] and "vs 'concept3'" in out.result[2]
    assert stub_env.comfy["comfy.utils"].bars[-1].updates[:3] == [(0, 41), (32, 41), (41, 41)]
    clip.encoded_windows.clear()
    stub_env.comfy["comfy.model_management"].interrupt_processing = True
    with pytest.raises(stub_env.comfy["comfy.model_management"].InterruptProcessingException):
        run(stub_env, model, "forty.safetensors", **gate)
    assert clip.encoded_windows == []  # Cancel stops the gate's encoding


def test_the_gate_report_quotes_a_long_concept_short(stub_env, erasers):
    weights = sd1_weights()
    save_file({"model." + K: weights[K] + 0.01}, str(erasers / "long.safetensors"),
              metadata={"concept_text": "snoopy " * 2000})
    gate = {"gate": "facilitated transport", "clip": FakeClip(), "prompt": "snoopy"}
    out = run(stub_env, FakePatcher(weights), "long.safetensors", **gate)
    report = out.result[2]
    assert "snoopy " * 20 not in report and "...'" in report and len(report) < 600


def _patch_file(path, tensors, meta="{}"):
    save_file(tensors, str(path), metadata={"format": "concept_erasure.patchset", "format_version": "1", "meta": meta})


def test_a_patch_file_for_other_shapes_is_refused_before_anything_is_patched(stub_env, erasers):
    """ComfyUI only logs "SHAPE MISMATCH ... WEIGHT NOT MERGED" for such an entry: the user would
    sample the model un-erased with nothing on the node."""
    weights = sd1_weights()
    model = FakePatcher(weights)
    rows = weights[K].shape[0]
    _patch_file(erasers / "wide.safetensors", {K + ".lora_up": torch.zeros(rows, 4),
                                               K + ".lora_down": torch.zeros(4, 1000)})
    err = stub_env.core.PatchError
    with pytest.raises(err, match=rf"Apply Eraser LoRA, input 'eraser': every patch entry must have the shape .* "
                                  rf"'{K}' is {rows}x1000 in the patch but {rows}x768 in the model"):
        run(stub_env, model, "wide.safetensors")
    _patch_file(erasers / "dense.safetensors", {K + ".diff": torch.zeros(rows + 1, 768)})
    with pytest.raises(err, match=rf"input 'eraser'.*is {rows + 1}x768 in the patch but {rows}x768"):
        run(stub_env, model, "dense.safetensors")
    assert model.patches == {}


def test_a_malformed_patch_file_names_the_eraser_input(stub_env, erasers):
    _patch_file(erasers / "meta.safetensors", {K + ".diff": torch.zeros(8, 768)}, meta='"x"')
    with pytest.raises(stub_env.core.PatchError, match=r"input 'eraser': the 'meta' of patch file 'meta\.safetensors' "
                                                       "must be a JSON object"):
        run(stub_env, FakePatcher(sd1_weights()), "meta.safetensors")


def test_queue_time_refuses_forged_headers_naming_the_input(stub_env, erasers):
    """A 1-D lora_up in a patch file, a 1-D Receler down.weight: IndexError before (a generic error
    naming no input); deeply nested JSON metadata: RecursionError."""
    node = stub_env.pack.nodes.apply_eraser.ApplyEraserLoRA
    _patch_file(erasers / "flat.safetensors", {K + ".lora_up": torch.zeros(8), K + ".lora_down": torch.zeros(4, 768)})
    block = "down_blocks.0.attentions.0"
    save_file({f"{block}.down.weight": torch.zeros(4), f"{block}.down.bias": torch.zeros(4),
               f"{block}.up.weight": torch.zeros(320, 4), f"{block}.up.bias": torch.zeros(320)},
              str(erasers / "receler.safetensors"))
    for name in ("flat.safetensors", "receler.safetensors"):
        message = node.validate_inputs(eraser=name)
        assert message.startswith("Apply Eraser LoRA, input 'eraser'") and "must hold 2-D matrices" in message, message
    save_file({"model." + K: torch.zeros(8, 768)}, str(erasers / "deep.safetensors"),
              metadata={"concept_text": "[" * 50_000, "meta": "{" * 50_000})
    assert node.validate_inputs(eraser="deep.safetensors") is True
