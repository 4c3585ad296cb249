"""Bad inputs through the HTTP API of one real headless ComfyUI (issue #14).

Every node gets malformed values of each input type (NaN floats, combo values outside their list,
hostile file names), hostile file contents (truncated, NaN, wrong shape, rank 0, pickles) and
ambiguous concept syntax. Each case asserts: a clear error that names the node and the input
(queue-time: HTTP 400 with the node's error; run time: ComfyUI's execution_error carrying our
ErasureError), a server that still answers, and no file written or changed anywhere under the
server's base directory. One server for the whole module (the fixture of test_server.py); small
inputs except where size is the point.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import threading
import time
import uuid

import pytest
import torch
from safetensors.torch import save_file
from test_server import CHECKPOINT_NAME, _wait_for_history, server  # noqa: F401 (the module's one server)
from tiny_erasers import KOHYA

pytestmark = pytest.mark.comfyui

NAN = float("nan")
SPM_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


class Evil:  # a pickle that would run code if unpickled
    def __reduce__(self):
        return (print, ("pickle executed",))


def _lora(up_shape=(320, 2), down_shape=(2, 768), fill=0.05, alpha=2.0) -> dict[str, torch.Tensor]:
    return {f"{KOHYA.format('k')}.lora_up.weight": torch.full(up_shape, fill),
            f"{KOHYA.format('k')}.lora_down.weight": torch.full(down_shape, 0.05),
            f"{KOHYA.format('k')}.alpha": torch.tensor(alpha)}


@pytest.fixture(scope="module")
def hostile(server):  # noqa: F811
    """Hostile files in the server's folders (written once, before the snapshots)."""
    base = server.base
    erasers, spm, concepts = base / "models" / "erasers", base / "models" / "spm", base / "models" / "concepts"
    save_file(_lora(up_shape=(320, 0), down_shape=(0, 768)), str(erasers / "rank0.safetensors"))
    save_file(_lora(fill=NAN), str(erasers / "nan.safetensors"))
    save_file(_lora(up_shape=(321, 2)), str(erasers / "wrong_shape.safetensors"))
    save_file(_lora(alpha=NAN), str(erasers / "nan_alpha.safetensors"))
    whole = (erasers / "wrong_shape.safetensors").read_bytes()
    (erasers / "truncated.safetensors").write_bytes(whole[: len(whole) - 100])
    torch.save({"x": Evil(), KOHYA.format("k") + ".lora_up.weight": torch.zeros(320, 2)}, erasers / "evil.pt")
    (erasers / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    spm_rank0 = {f"{SPM_KEY}.lora_up.weight": torch.zeros(320, 0), f"{SPM_KEY}.lora_down.weight": torch.zeros(0, 768),
                 f"{SPM_KEY}.alpha": torch.tensor(1.0)}
    save_file(spm_rank0, str(spm / "rank0.safetensors"), {"prompts": "cat", "rank": "1", "alpha": "1.0"})
    spm_ok = {f"{SPM_KEY}.lora_up.weight": torch.zeros(320, 1), f"{SPM_KEY}.lora_down.weight": torch.zeros(1, 768),
              f"{SPM_KEY}.alpha": torch.tensor(NAN)}
    save_file(spm_ok, str(spm / "nan_alpha.safetensors"), {"prompts": "cat", "rank": "1", "alpha": "1.0"})
    (concepts / "ragged.csv").write_text("target,anchor\ncat,dog,extra\n")
    (concepts / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (concepts / "two_arrows.txt").write_text("cat -> dog -> fish\n")
    # over the 64 KiB read at queue time: read (and refused) when the node runs
    (concepts / "huge_version.json").write_text(json.dumps({"format": "concept_erasure.concepts", "version": "x" * 10**6}))
    return base


def _snapshot(base) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and p.suffix not in (".log", ".db", ".db-journal")
            and "user" not in p.relative_to(base).parts}


def _post(server, graph):  # noqa: F811
    req_body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex})  # NaN goes out as NaN
    import urllib.error
    import urllib.request

    from test_server import _OPENER
    req = urllib.request.Request(server.url + "/prompt", data=req_body.encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with _OPENER.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


CK, LC = "ck", "lc"


def _checkpoint():
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}}


def _load_concepts(**inputs):
    values = {"targets": "cat", "anchors": "dog", "preserve": "", "kind": "generic", "preset": "none", "file": "none",
              "templates": "as given", "custom_templates": "", "preserve_set": "none"}
    return {"class_type": "CE_LoadConcepts", "inputs": values | inputs}


def _preview(node, slot=0):
    return {"class_type": "PreviewAny", "inputs": {"source": [node, slot]}}


def g_load(**inputs):
    return {"n": _load_concepts(**inputs), "out": _preview("n")}, "n", "Load Concepts"


def g_save(**inputs):
    return {LC: _load_concepts(), "n": {"class_type": "CE_SaveConcepts", "inputs": {
        "concepts": [LC, 0], "filename": "x.json", "overwrite": False} | inputs}}, "n", "Save Concepts"


CF_WIDGETS = {"method": "uce", "strength": 1.0, "token_pick": "last word + EOT + padding", "erase_scale": 1.0,
              "preserve_scale": 0.1, "lamb": 0.5, "preserve_empty_prompt": True, "solve_dtype": "float64"}


def g_erase(options=None, **inputs):
    graph = {CK: _checkpoint(), LC: _load_concepts(), "n": {"class_type": "CE_ClosedFormErase", "inputs": {
        "model": [CK, 0], "clip": [CK, 1], "concepts": [LC, 0]} | CF_WIDGETS | inputs}, "out": _preview("n", 2)}
    if options is not None:
        graph["o"] = {"class_type": "CE_SPEEDOptions", "inputs": options}
        graph["n"]["inputs"] |= {"options": ["o", 0], "method": "speed"}
    return graph, ("o" if options is not None else "n"), ("SPEED Options" if options is not None
                                                          else "Closed-Form Erase")


def _speed_defaults(server):  # noqa: F811
    info = server.get("/object_info/CE_SPEEDOptions")["CE_SPEEDOptions"]["input"]["required"]
    return {k: (v[0][0] if isinstance(v[0], list) else v[1].get("default")) for k, v in info.items()}


def g_eraser(**inputs):
    return {CK: _checkpoint(), "n": {"class_type": "CE_ApplyEraserLoRA", "inputs": {
        "model": [CK, 0], "clip": [CK, 1], "eraser": "vangogh_lora.safetensors", "strength": 1.0,
        "gate": "off", "prompt": "", "concept_text": "",
        "facilitate_factor": 1.0, "gate_threshold": 0.0} | inputs}, "out": _preview("n")}, "n", "Apply Eraser LoRA"


def g_spm(**inputs):
    slots = {f"spm_{k}": "none" for k in range(2, 5)} | {f"strength_{k}": 1.0 for k in range(1, 5)}
    return {CK: _checkpoint(), "n": {"class_type": "CE_ApplySPM", "inputs": {
        "model": [CK, 0], "clip": [CK, 1], "prompt": "a cat", "facilitate_factor": 1.0,
        "spm_1": "snoopy.safetensors"} | slots | inputs}, "out": _preview("n")}, "n", "Apply SPM"


def g_extract(**inputs):
    return {CK: _checkpoint(), "n": {"class_type": "CE_ExtractEraser", "inputs": {
        "model": [CK, 0], "erased_file": "esd_x_vangogh.safetensors", "max_rank": 4, "max_error": 0.05,
        "filename": "new_eraser.safetensors", "concept_text": "", "overwrite": False} | inputs}}, "n", "Extract Eraser"


def g_attack(**inputs):
    return {CK: _checkpoint(), "n": {"class_type": "CE_AttackPrompt", "inputs": {
        "model": [CK, 0], "clip": [CK, 1], "concept": "cat", "mode": "concept_vector", "carrier": "a photo",
        "pairs": "", "save_embedding": "", "overwrite": False, "strength": 3.0} | inputs},
        "out": _preview("n", 1)}, "n", "Attack Prompt"


def _with_defaults(server, graph, node):  # noqa: F811
    """Widgets the case does not set take their defaults from the server's /object_info."""
    kind = graph[node]["class_type"]
    info = server.get(f"/object_info/{kind}")[kind]["input"]
    for name, spec in {**info["required"], **info.get("optional", {})}.items():
        if name not in graph[node]["inputs"] and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
            graph[node]["inputs"][name] = spec[1]["default"]
    return graph


CASES = {
    # Load Concepts, queue time
    "load kind not in list": (g_load(kind="bogus"), "kind"),
    "load templates not in list": (g_load(templates="bogus"), "templates"),
    "load preset not in list": (g_load(preset="nope"), "preset"),
    "load file outside folders": (g_load(file="../../server.log"), "file"),
    "load named template field": (g_load(templates="custom", custom_templates="a {name} of {}"), "custom_templates"),
    "load stray brace": (g_load(templates="custom", custom_templates="a { of {}"), "custom_templates"),
    "load second arrow": (g_load(targets="cat -> dog -> fish", anchors=""), "targets"),
    "load alternation": (g_load(targets="[cat|dog]", anchors=""), "targets"),
    "load separator only": (g_load(targets=",", anchors=""), "targets"),
    "load missing embedding": (g_load(targets="embedding:missing_name", anchors=""), "targets"),
    "load ragged csv": (g_load(targets="", anchors="", file="ragged.csv"), "file"),
    "load deep json": (g_load(targets="", anchors="", file="deep.json"), "file"),
    "load second arrow in file": (g_load(targets="", anchors="", file="two_arrows.txt"), "file"),
    "load long word": (g_load(targets="x" * 20_000, anchors=""), "targets"),
    "load 25 million prompts": (g_load(targets="\n".join(f"t{i}" for i in range(5000)), anchors="", templates="custom",
                                       custom_templates="\n".join(f"{{}} v{i}" for i in range(5000))), "custom_templates"),
    "load megabyte version in a large file": (g_load(targets="", anchors="", file="huge_version.json"), "file"),
    # Save Concepts, queue time
    "save NUL in name": (g_save(filename="a\x00b.json"), "filename"),
    "save newline in name": (g_save(filename="a\nb.json"), "filename"),
    "save 300-character name": (g_save(filename="n" * 300), "filename"),
    "save reserved name": (g_save(filename="CON"), "filename"),
    "save folder in name": (g_save(filename="../evil.json"), "filename"),
    # Closed-Form Erase and SPEED Options, run time
    "erase strength NaN": (g_erase(strength=NAN), "strength"),
    "erase lamb NaN": (g_erase(lamb=NAN), "lamb"),
    "erase erase_scale NaN": (g_erase(erase_scale=NAN), "erase_scale"),
    "erase token_pick not in list": (g_erase(token_pick="bogus"), "token_pick"),
    "speed threshold NaN": (None, "threshold"),
    # Apply Eraser LoRA, run time
    "eraser strength NaN": (g_eraser(strength=NAN), "strength"),
    "eraser facilitate NaN": (g_eraser(facilitate_factor=NAN), "facilitate_factor"),
    "eraser rank 0": (g_eraser(eraser="rank0.safetensors"), "eraser"),
    "eraser NaN weights": (g_eraser(eraser="nan.safetensors"), "eraser"),
    "eraser NaN alpha": (g_eraser(eraser="nan_alpha.safetensors"), "eraser"),
    "eraser wrong shape": (g_eraser(eraser="wrong_shape.safetensors"), "eraser"),
    "eraser truncated": (g_eraser(eraser="truncated.safetensors"), "eraser"),
    "eraser pickle .pt": (g_eraser(eraser="evil.pt"), "eraser"),
    "eraser pickle .ckpt": (g_eraser(eraser="pickle.ckpt"), "eraser"),
    "eraser gate 1100 concepts": (g_eraser(gate="facilitated transport", prompt="a cat",
                                           concept_text=", ".join(f"c{i}" for i in range(1100))), "concept_text"),
    # Apply SPM, run time
    "spm strength NaN": (g_spm(strength_1=NAN), "strength_1"),
    "spm rank 0": (g_spm(spm_1="rank0.safetensors"), "spm_1"),
    "spm NaN alpha": (g_spm(spm_1="nan_alpha.safetensors"), "spm_1"),
    "spm mode not in list": (g_spm(mode="bogus"), "mode"),
    "spm 1100 concepts": (g_spm(concepts_1=", ".join(f"c{i}" for i in range(1100))), "concepts_1"),
    # Extract Eraser
    "extract over its own input": (g_extract(filename="esd_x_vangogh.safetensors", overwrite=True), "filename"),
    "extract over an existing file": (g_extract(filename="vangogh_lora.safetensors"), "filename"),
    "extract NUL in name": (g_extract(filename="a\x00b"), "filename"),
    "extract truncated file": (g_extract(erased_file="truncated.safetensors"), "erased_file"),
    # Attack Prompt
    "attack NUL in save_embedding": (g_attack(mode="soft_prompt", save_embedding="a\x00b"), "save_embedding"),
    "attack strength NaN": (g_attack(strength=NAN), "strength"),
    "attack mode not in list": (g_attack(mode="bogus"), "mode"),
    "attack 257 pairs": (g_attack(pairs="a photo of a cat | a photo\n" * 257), "pairs"),
    "attack 60k concept": (g_attack(concept="y" * 60_000), "concept"),
}


def _error_text(server, graph, node):  # noqa: F811
    """(where, text, input names ComfyUI attributes) of the error the server gave for ``graph``."""
    status, body = _post(server, graph)
    if status == 400:
        errors = body.get("node_errors", {}).get(node, {}).get("errors", [])
        assert errors, f"HTTP 400 but no error on node {node}: {body}"
        text = " ".join(f"{e.get('message', '')} {e.get('details', '')}" for e in errors)
        names = {e.get("extra_info", {}).get("input_name") for e in errors}
        return "queue", text, names, body["node_errors"][node].get("class_type")
    assert status == 200, body
    entry = _wait_for_history(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "error", f"expected an error, got {entry['status']}"
    failure = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert failure["node_id"] == node, failure
    assert "erasure_core.errors" in failure["exception_type"], failure["exception_type"]
    return "run", failure["exception_message"], set(), failure["node_type"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_gets_a_clear_error_and_changes_nothing(server, hostile, case):  # noqa: F811
    (built, input_name) = CASES[case]
    if case == "speed threshold NaN":
        built = g_erase(options=_speed_defaults(server) | {"threshold": NAN})
    graph, node, display = built
    graph = _with_defaults(server, graph, "n")
    before = _snapshot(hostile)
    where, text, names, _ = _error_text(server, graph, node)
    ours = f"{display}, input '{input_name}'" in text
    comfy_own = where == "queue" and input_name in names and "not in list" in text
    assert ours or comfy_own, f"{case}: the error must name {display} and input '{input_name}': {text[:600]}"
    assert "Traceback" not in text
    # ComfyUI repeats a validate_inputs message once per input the method takes: measure one of them
    longest = max(len(part) for part in text.split("Custom validation failed for node"))
    assert longest < 1500, f"{case}: a {longest:,}-character message quotes too much: {text[:600]}"
    assert display != "Extract Eraser" or "eraser file" not in text, f"{case}: names Apply's input: {text[:600]}"
    assert server.get("/system_stats")["system"], "the server must still answer"
    assert _snapshot(hostile) == before, f"{case}: a file was written or changed"
    print(f"{case}: {where}: {text[:160]}")


def test_a_million_character_targets_is_refused_within_a_second_while_the_server_answers(server, hostile):  # noqa: F811
    graph, node, _ = g_load(targets="y" * 1_000_000, anchors="")
    answered: list[float] = []

    def ping() -> None:
        started = time.monotonic()
        server.get("/queue")
        answered.append(time.monotonic() - started)

    started = time.monotonic()
    pinger = threading.Timer(0.05, ping)
    pinger.start()
    status, body = _post(server, graph)
    elapsed = time.monotonic() - started
    pinger.join(10)
    assert status == 400 and "at most 50,000 characters" in json.dumps(body), body
    print(f"1,000,000-character targets refused in {elapsed:.3f} s; /queue answered in {answered[0]:.3f} s")
    assert elapsed < 1.0 and answered and answered[0] < 1.0


def test_zz_peak_memory_of_the_server(server):  # noqa: F811
    peak = server.peak_rss_mib()
    print(f"server peak RSS after the bad-input module: {peak} MiB")
    assert peak is None or math.isfinite(peak)


@pytest.mark.parametrize("build", [g_erase, g_eraser, g_spm], ids=["erase", "eraser", "spm"])
def test_the_same_graphs_with_good_values_run(server, hostile, build):  # noqa: F811
    """Control: the graphs above differ from a working one only in the bad value."""
    graph, node, _ = build()
    graph = _with_defaults(server, graph, "n")
    status, body = _post(server, graph)
    assert status == 200 and not body.get("node_errors"), body
    entry = _wait_for_history(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
