"""Apply SPM on a FakePatcher and a FakeClip under the stubbed ComfyUI: files from the registered
folders, the gate, the two combinations and the errors, checked on the effective weights."""

from __future__ import annotations

import pytest
import torch
from comfy_stubs import PREFIX, SITE_BLOCKS, FakeClip, FakePatcher, sd1_weights
from safetensors.torch import save_file

TOL = {"rtol": 1e-5, "atol": 1e-6}


def kohya(key: str) -> str:
    return "lora_unet_" + key[len(PREFIX):-len(".weight")].replace(".", "_")


def site_keys() -> list[str]:
    return [f"{PREFIX}{b}.transformer_blocks.0.attn2.to_{p}.weight" for b in SITE_BLOCKS for p in ("k", "v")]


def write_spm(path, seed=0, prompts="snoopy", alpha=1.0, keys=None):
    """An SPM in the released layout (rank 1, fp16 factors, alpha, metadata) for the fake SD1 model."""
    g = torch.Generator().manual_seed(seed)
    weights = sd1_weights()
    sd = {}
    for key in keys or site_keys():
        out, inp = weights[key].shape if key in weights else (8, 768)
        sd[f"{kohya(key)}.lora_down.weight"] = (torch.randn(1, inp, generator=g) * 0.1).half()
        sd[f"{kohya(key)}.lora_up.weight"] = (torch.randn(out, 1, generator=g) * 0.1).half()
        sd[f"{kohya(key)}.alpha"] = torch.tensor(alpha).half()
    metadata = {"rank": "1", "alpha": str(alpha)}
    if prompts is not None:
        metadata["prompts"] = prompts
    save_file(sd, str(path), metadata)
    return sd


def full_delta(sd, key, scale=1.0):
    return scale * sd[f"{kohya(key)}.lora_up.weight"].float() @ sd[f"{kohya(key)}.lora_down.weight"].float()


@pytest.fixture
def folders(stub_env, model_folder):
    folder_paths = stub_env.comfy["folder_paths"]
    return model_folder(folder_paths, "spm", {".safetensors"}), model_folder(folder_paths, "loras", {".safetensors"})


def run(env, model, prompt="a photo of snoopy", mode="facilitated transport", clip=None, **slots):
    node = env.pack.nodes.apply_spm
    inputs = {f"{name}_{k}": default for k in range(1, 5)
              for name, default in (("spm", "none"), ("strength", 1.0), ("concepts", ""))}
    return node.ApplySPM.execute(model=model, clip=clip or FakeClip(), prompt=prompt, mode=mode,
                                 facilitate_factor=1.0, **(inputs | slots))


def live(env, model, key):
    return env.calculate_weight(model.patches.get(key, []), model.weights[key].float().clone(), key)


def delta(env, model, key):
    return live(env, model, key) - model.weights[key].float()


def clipcos_by_hand(clip, prompt, target):
    a = clip.encode_from_tokens({"l": [clip.tokenize(prompt)["l"][0]]}).flatten().double()
    b = clip.encode_from_tokens({"l": [clip.tokenize(target)["l"][0]]}).flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def test_files_in_spm_and_loras_are_listed(stub_env, folders):
    spm, loras = folders
    write_spm(spm / "snoopy.safetensors")
    write_spm(loras / "style.safetensors", prompts=None)
    assert stub_env.pack.nodes._comfy.spm_file_choices() == ["none", "snoopy.safetensors", "loras/style.safetensors"]


def test_target_prompt_gets_the_full_membrane_and_an_unrelated_one_its_gate(stub_env, folders):
    spm, _ = folders
    sd = write_spm(spm / "snoopy.safetensors", prompts="snoopy")
    model = FakePatcher(sd1_weights())
    full, report = run(stub_env, model, prompt="snoopy", spm_1="snoopy.safetensors").result
    assert "gate 1.000" in report
    for key in site_keys():
        torch.testing.assert_close(delta(stub_env, full, key), full_delta(sd, key), **TOL)

    unrelated = "a red barn in a wheat field"
    clip = FakeClip()
    gate = clipcos_by_hand(clip, unrelated, "snoopy")  # no shared token: tokenuni is 0
    out = run(stub_env, model, prompt=unrelated, clip=clip, spm_1="snoopy.safetensors")
    part, report = out.result
    assert f"gate {gate:.3f}" in report and "tokenuni 0.000" in report
    assert out.ui["text"] == [report]
    (bar,) = out.ui["ce_report"][0]["bars"]  # the gate, drawn on the node
    assert bar["label"] == "snoopy gate" and bar["value"] == pytest.approx(gate, abs=5e-4) and bar["good"] == "high"
    for key in site_keys():
        torch.testing.assert_close(delta(stub_env, part, key), gate * full_delta(sd, key), **TOL)
    assert model.patches == {}  # the input model is untouched


def test_strength_and_alpha_scale_the_gated_membrane(stub_env, folders):
    spm, _ = folders
    sd = write_spm(spm / "a.safetensors", prompts="snoopy", alpha=0.5)
    model = FakePatcher(sd1_weights())
    out, _ = run(stub_env, model, prompt="snoopy dog", spm_1="a.safetensors", strength_1=0.8).result
    key = site_keys()[0]
    torch.testing.assert_close(delta(stub_env, out, key), 0.8 * full_delta(sd, key, 0.5), **TOL)


def test_always_on_ignores_the_prompt(stub_env, folders):
    spm, _ = folders
    sd = write_spm(spm / "a.safetensors")
    out, report = run(stub_env, FakePatcher(sd1_weights()), prompt="", mode="always on",
                      spm_1="a.safetensors", strength_1=0.5).result
    key = site_keys()[1]
    torch.testing.assert_close(delta(stub_env, out, key), 0.5 * full_delta(sd, key), **TOL)
    assert "always on, strength 0.5" in report


def test_reference_mode_uses_m_squared_and_a_product_of_sums(stub_env, folders):
    spm, _ = folders
    a = write_spm(spm / "a.safetensors", seed=1, prompts="snoopy")
    b = write_spm(spm / "b.safetensors", seed=2, prompts="mickey")
    model = FakePatcher(sd1_weights())
    key = site_keys()[2]
    one, _ = run(stub_env, model, prompt="snoopy", mode="reference code", spm_1="a.safetensors",
                 strength_1=0.5).result
    torch.testing.assert_close(delta(stub_env, one, key), 0.25 * full_delta(a, key), **TOL)

    both, _ = run(stub_env, model, prompt="snoopy and mickey", mode="reference code",
                  spm_1="a.safetensors", spm_3="b.safetensors").result  # both gates are 1 (tokenuni)
    ua, da = (a[f"{kohya(key)}.lora_{n}.weight"].float() for n in ("up", "down"))
    ub, db = (b[f"{kohya(key)}.lora_{n}.weight"].float() for n in ("up", "down"))
    torch.testing.assert_close(delta(stub_env, both, key), (ua + ub) @ (da + db), **TOL)
    paper, _ = run(stub_env, model, prompt="snoopy and mickey", spm_1="a.safetensors", spm_3="b.safetensors").result
    torch.testing.assert_close(delta(stub_env, paper, key), ua @ da + ub @ db, **TOL)


def test_a_plain_lora_needs_its_concept_text(stub_env, folders):
    _, loras = folders
    sd = write_spm(loras / "plain.safetensors", prompts=None)
    model = FakePatcher(sd1_weights())
    with pytest.raises(stub_env.core.ConceptError, match="concepts_2") as err:
        run(stub_env, model, spm_2="loras/plain.safetensors")
    assert err.value.input_name == "concepts_2" and "Apply SPM" in str(err.value)
    out, report = run(stub_env, model, prompt="snoopy", spm_2="loras/plain.safetensors", concepts_2="snoopy").result
    key = site_keys()[0]
    torch.testing.assert_close(delta(stub_env, out, key), full_delta(sd, key), **TOL)


def test_bad_inputs_name_the_node_and_input_and_leave_the_model_alone(stub_env, folders):
    spm, _ = folders
    write_spm(spm / "a.safetensors")
    write_spm(spm / "other_arch.safetensors", keys=[f"{PREFIX}output_blocks.9.1.transformer_blocks.0.attn2.to_k.weight"])
    model = FakePatcher(sd1_weights())
    core = stub_env.core
    with pytest.raises(core.ConceptError) as err:
        run(stub_env, model)
    assert err.value.input_name == "spm_1"
    with pytest.raises(core.ConceptError) as err:
        run(stub_env, model, prompt="  ", spm_1="a.safetensors")
    assert err.value.input_name == "prompt"
    with pytest.raises(core.ArchitectureError, match="lora_unet_output_blocks_9_1") as err:
        run(stub_env, model, spm_1="a.safetensors", spm_2="other_arch.safetensors")
    assert err.value.input_name == "spm_2"
    with pytest.raises(core.ErasureError, match="models/spm|listed values") as err:
        run(stub_env, model, spm_1="../a.safetensors")
    assert err.value.input_name == "spm_1"
    assert model.patches == {}


def test_queue_time_validation_names_the_input(stub_env, folders):
    spm, loras = folders
    write_spm(spm / "a.safetensors")
    write_spm(loras / "plain.safetensors", prompts=None)
    node = stub_env.pack.nodes.apply_spm.ApplySPM
    slots = {"spm_1": "none", "spm_2": "none", "spm_3": "none", "spm_4": "none",
             "concepts_1": "", "concepts_2": "", "concepts_3": "", "concepts_4": ""}
    ft = "facilitated transport"
    assert "input 'spm_1'" in node.validate_inputs(mode=ft, **slots)
    assert node.validate_inputs(mode=ft, **(slots | {"spm_1": "a.safetensors"})) is True
    message = node.validate_inputs(mode=ft, **(slots | {"spm_3": "loras/plain.safetensors"}))
    assert message.startswith("Apply SPM, input 'concepts_3'")
    assert node.validate_inputs(mode="always on", **(slots | {"spm_3": "loras/plain.safetensors"})) is True
    assert node.validate_inputs(mode=ft, **(slots | {"spm_3": "loras/plain.safetensors", "concepts_3": "x"})) is True
    assert "input 'spm_2'" in node.validate_inputs(mode=ft, **(slots | {"spm_2": "gone.safetensors"}))
    assert node.validate_inputs(mode=ft, **(slots | {"spm_1": None})) is True  # linked: checked at run time


def test_a_changed_file_changes_the_fingerprint(stub_env, folders):
    import os

    spm, _ = folders
    write_spm(spm / "a.safetensors")
    node = stub_env.pack.nodes.apply_spm.ApplySPM
    before = node.fingerprint_inputs(spm_1="a.safetensors", spm_2="none", spm_3="none", spm_4="none")
    stat = os.stat(spm / "a.safetensors")
    os.utime(spm / "a.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = node.fingerprint_inputs(spm_1="a.safetensors", spm_2="none", spm_3="none", spm_4="none")
    assert before != after
    assert node.fingerprint_inputs(spm_1="missing.safetensors")[0] == "missing.safetensors"  # execute will refuse it


def test_gate_concepts_are_deduplicated_limited_and_encoded_in_chunks(stub_env, folders):
    spm, _ = folders
    write_spm(spm / "many.safetensors", prompts=",".join(f"c{i}" for i in range(1100)))
    write_spm(spm / "forty.safetensors", prompts=",".join(f"c{i}" for i in range(40)))
    model, clip, core = FakePatcher(sd1_weights()), FakeClip(), stub_env.core
    with pytest.raises(core.ConceptError, match=r"at most 1,024, but the 'prompts' metadata of 'many\.safetensors' "
                                                r"lists 1,100 distinct concepts \('c0', .* and 1,095 more\)") as err:
        run(stub_env, model, clip=clip, spm_2="many.safetensors")
    assert err.value.input_name == "spm_2" and "Apply SPM" in str(err.value)
    typed = ", ".join(f"x{i}" for i in range(1025))
    with pytest.raises(core.ConceptError, match="concepts_1 lists 1,025 distinct") as err:
        run(stub_env, model, clip=clip, spm_1="forty.safetensors", concepts_1=typed)
    assert err.value.input_name == "concepts_1"
    assert clip.encoded_windows == [] and model.patches == {}  # refused before any encoding
    out, _ = run(stub_env, model, mode="always on", spm_2="many.safetensors").result  # no gate: no limit
    assert out.patches
    node = stub_env.pack.nodes.apply_spm.ApplySPM
    slots = {"spm_1": "none", "spm_2": "many.safetensors", "spm_3": "none", "spm_4": "none",
             "concepts_1": "", "concepts_2": "", "concepts_3": "", "concepts_4": ""}
    assert node.validate_inputs(mode="facilitated transport", **slots).startswith("Apply SPM, input 'spm_2'")
    assert node.validate_inputs(mode="always on", **slots) is True
    assert node.validate_inputs(mode="facilitated transport", **(slots | {"concepts_2": "snoopy"})) is True
    message = node.validate_inputs(mode="facilitated transport", **(slots | {"concepts_2": typed}))
    assert message.startswith("Apply SPM, input 'concepts_2'")
    _, report = run(stub_env, model, prompt="c3", clip=clip, spm_1="many.safetensors",
                    concepts_1="c3, " * 5000).result  # the typed list replaces the file's; duplicates once
    assert clip.encoded_windows == [1, 1] and "gate 1.000" in report
    clip.encoded_windows.clear()
    _, report = run(stub_env, model, prompt="c3", clip=clip, spm_1="forty.safetensors").result
    assert clip.encoded_windows == [1, 32, 8] and "vs 'c3'" in report  # the prompt, then 40 concepts by 32
    assert (0, 40) in stub_env.comfy["comfy.utils"].bars[-1].updates
    mm = stub_env.comfy["comfy.model_management"]

    class CancelledClip(FakeClip):  # Cancel is pressed while the prompt is encoded
        def encode_from_tokens(self, tokens):
            mm.interrupt_processing = True
            return super().encode_from_tokens(tokens)

    cancelled = CancelledClip()
    with pytest.raises(mm.InterruptProcessingException):
        run(stub_env, model, prompt="c3", clip=cancelled, spm_1="forty.safetensors")
    assert cancelled.encoded_windows == [1]  # the prompt only: no concept was encoded after Cancel
