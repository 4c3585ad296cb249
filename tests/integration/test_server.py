"""End to end: the example workflow through the HTTP API of a real headless ComfyUI server.

A module-scoped fixture starts ``main.py --cpu`` on a loopback port with a throwaway base
directory: ``custom_nodes/concept_erasure`` is a symlink to this repository and
``models/checkpoints/`` holds the tiny SD1.5-detected checkpoint under the name the example
workflow uses. The UI-format example (nodes/links/widgets_values) is converted to the API format
with the server's own ``/object_info`` schemas, shrunk to 64x64 and 2 steps, and queued.
See research/comfyui.md section 7.1 (flags) and 7.2 (HTTP API).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tiny_erasers
import tiny_spm
from comfy_env import ROOT, comfyui_path

pytestmark = pytest.mark.comfyui

WORKFLOW = Path(ROOT) / "example_workflows" / "closed_form_erase_uce.json"
CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors"
OUR_NODES = ("CE_LoadConcepts", "CE_MergeConcepts", "CE_SaveConcepts", "CE_ClosedFormErase", "CE_SaveErasure",
             "CE_UCEOptions", "CE_SPEEDOptions", "CE_RECEOptions", "CE_RealEraOptions", "CE_ApplySPM", "CE_AttackPrompt",
             "CE_ApplyEraserLoRA", "CE_ExtractEraser")
EXAMPLES = sorted((Path(ROOT) / "example_workflows").glob("*.json"))
# Examples whose model files the test server cannot have (full-size DiTs): converted, not run
NEEDS_FULL_MODELS = {"closed_form_erase_flux"}
RUNNABLE = [p for p in EXAMPLES if p.stem not in NEEDS_FULL_MODELS]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
STARTUP_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0

# No proxy, whatever the environment says: the server is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    """A running ComfyUI: its URL, base directory and log file."""

    url: str
    base: Path
    log: Path
    pid: int = 0

    def peak_rss_mib(self) -> float | None:
        """The server process's peak resident memory (Linux ``VmHWM``), or None where unreadable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError):
            return None
        return None

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return text[-chars:]

    def get(self, path: str) -> Any:
        with _OPENER.open(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, payload: dict) -> tuple[int, Any]:
        """POST JSON; return (HTTP status, decoded body) also for 4xx answers."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with _OPENER.open(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, body.decode(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(server: Server, proc: subprocess.Popen) -> None:
    """Poll ``/object_info/CE_ClosedFormErase`` until our node is registered."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode} during start-up; log tail:\n"
                        f"{server.log_tail()}")
        try:
            if "CE_ClosedFormErase" in server.get("/object_info/CE_ClosedFormErase"):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f"ComfyUI did not register CE_ClosedFormErase within {STARTUP_TIMEOUT_S:.0f} s; "
                f"log tail:\n{server.log_tail()}")


def prepare_base(base: Path, tiny_state_dict) -> None:
    """A ComfyUI base directory with this pack, the tiny checkpoint and the files the examples pick."""
    from safetensors.torch import save_file

    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "concept_erasure").symlink_to(ROOT, target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, str(checkpoints / CHECKPOINT_NAME))
    (base / "models" / "concepts").mkdir()
    (base / "models" / "concepts" / "team_list.csv").write_text(
        "target,anchor,aliases,kind,preserve\nVincent van Gogh,a painter,Van Gogh,artist,Claude Monet\n")
    (base / "models" / "spm").mkdir()  # apply_spm.json picks snoopy.safetensors
    tiny_spm.write_spm(base / "models" / "spm" / "snoopy.safetensors", tiny_state_dict, "snoopy")
    erasers = base / "models" / "erasers"  # apply_eraser.json picks these two
    erasers.mkdir()
    tiny_erasers.write_esd_x(erasers / "esd_x_vangogh.safetensors", tiny_state_dict)
    tiny_erasers.write_kohya_lora(erasers / "vangogh_lora.safetensors", "Van Gogh")
    (base / "input").mkdir()
    (base / "input" / "from_input.txt").write_text("Pikachu -> a yellow cartoon creature\n")


@contextmanager
def launch(base: Path, front_end_root: Path) -> Iterator[Server]:
    """Run ComfyUI (--cpu, loopback only) on ``base`` serving the front-end at ``front_end_root``
    (an empty folder when no browser is used); stop it on exit."""
    port = _free_port()
    srv = Server(url=f"http://127.0.0.1:{port}", base=base, log=base / "server.log")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--front-end-root", str(front_end_root),
           "--disable-api-nodes", "--database-url", f"sqlite:///{base / 'comfy.db'}", "--log-stdout"]
    with open(srv.log, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        srv.pid = proc.pid
        try:
            _wait_until_up(srv, proc)
            yield srv
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_state_dict) -> Iterator[Server]:
    """A headless ComfyUI (--cpu, loopback only) with this pack and the tiny checkpoint."""
    base = tmp_path_factory.mktemp("comfy_base")
    prepare_base(base, tiny_state_dict)
    front_end = base / "empty_front_end"
    front_end.mkdir()
    with launch(base, front_end) as srv:
        yield srv


def _input_specs(info: dict) -> dict[str, list]:
    """name -> [type, options] over required and optional inputs."""
    specs: dict[str, list] = {}
    for section in ("required", "optional"):
        specs.update(info.get("input", {}).get(section, {}))
    return specs


def _input_order(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return [*order.get("required", []), *order.get("optional", [])]


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format workflow (nodes/links/widgets_values) to the API format.

    Linked inputs become ``[str(from_node), from_slot]``. Widget inputs (in ``input_order``,
    required then optional) take the node's ``widgets_values`` in order; a seed-like INT input
    (``control_after_generate``, or named seed/noise_seed) is followed by one extra value, the
    "fixed"/"randomize" control, which is skipped. A widget that was turned into a linked socket
    still holds a value, so it consumes one too and the link wins. ``object_info`` maps each
    node type to its ``/object_info`` entry. Only active nodes (mode 0) are supported.
    """
    links = {link[0]: link for link in workflow["links"]}
    graph: dict[str, dict] = {}
    for node in workflow["nodes"]:
        node_id, node_type = str(node["id"]), node["type"]
        assert node.get("mode", 0) == 0, f"node {node_id} ({node_type}) is muted/bypassed: unsupported"
        info = object_info[node_type]
        specs = _input_specs(info)
        linked = {}
        for socket_ in node.get("inputs", []):
            if socket_.get("link") is not None:
                _, from_node, from_slot, _, _, _ = links[socket_["link"]]
                linked[socket_["name"]] = [str(from_node), from_slot]
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        pos = 0
        for name in _input_order(info):
            spec = specs[name]
            if _is_widget(spec) and pos < len(values):
                inputs[name] = values[pos]
                pos += 1
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if spec[0] == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                    pos += 1
            if name in linked:
                inputs[name] = linked[name]
        assert pos == len(values), (
            f"node {node_id} ({node_type}): {len(values)} widgets_values but the schema's widgets "
            f"take {pos}: {values!r}")
        unknown = set(linked) - set(specs)
        assert not unknown, f"node {node_id} ({node_type}) has links to unknown inputs {unknown}"
        graph[node_id] = {"class_type": node_type, "inputs": inputs}
    return graph


def _upstream(graph: dict[str, dict], node_id: str) -> dict[str, dict]:
    """The part of ``graph`` that ``node_id`` depends on, itself included."""
    keep, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        if current in keep:
            continue
        keep.add(current)
        todo += [v[0] for v in graph[current]["inputs"].values() if isinstance(v, list) and len(v) == 2
                 and isinstance(v[0], str) and v[0] in graph]
    return {k: json.loads(json.dumps(graph[k])) for k in keep}


def _example_graph(server: Server, path: Path = WORKFLOW) -> dict[str, dict]:
    """An example workflow in API format; every node type in it must be registered."""
    workflow = json.loads(path.read_text())
    types = sorted({node["type"] for node in workflow["nodes"]})
    object_info = server.get("/object_info")
    missing = [t for t in types if t not in object_info]
    assert not missing, f"the example references unregistered node types: {missing}"
    return ui_to_api(workflow, {t: object_info[t] for t in types})


def _wait_for_history(server: Server, prompt_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish within {RUN_TIMEOUT_S:.0f} s; log tail:\n"
                f"{server.log_tail()}")


def test_object_info_lists_our_nodes_with_tooltips(server):
    info = server.get("/object_info")
    for node_id in OUR_NODES:
        assert node_id in info, f"{node_id} not registered; log tail:\n{server.log_tail()}"
        assert info[node_id]["category"].startswith("concept_erasure")
        specs = _input_specs(info[node_id])
        assert specs, f"{node_id} has no inputs"
        untipped = [name for name, spec in specs.items()
                    if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"))]
        assert not untipped, f"{node_id} inputs without a tooltip: {untipped}"


def _run_fast(server: Server, graph: dict[str, dict]) -> dict:
    """Queue ``graph`` shrunk to 64x64 and 2 steps, and without the 300-name preserve lists (their
    encoding alone takes minutes on 2 CPU cores; tests/core covers them); the history entry of a
    successful run."""
    for node in graph.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
        elif node["class_type"] == "CE_LoadConcepts":
            node["inputs"]["preserve_set"] = "none"
    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    assert status == 200, f"POST /prompt answered {status}: {body}"
    assert not body.get("node_errors"), body
    entry = _wait_for_history(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", (
        f"{json.dumps(entry['status'], indent=1)[-4000:]}\nlog tail:\n{server.log_tail()}")
    return entry


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.stem in NEEDS_FULL_MODELS])
def test_examples_for_full_size_dits_convert_with_registered_nodes(server, path):
    graph = _example_graph(server, path)  # every node registered, every widget value placed
    assert any(v["class_type"] == "CE_ClosedFormErase" for v in graph.values())


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_every_example_workflow_runs(server, path):
    entry = _run_fast(server, _example_graph(server, path))
    graph = _example_graph(server, path)
    saves = [k for k, v in graph.items() if v["class_type"] == "SaveImage"]
    assert saves and all(entry["outputs"].get(k, {}).get("images") for k in saves)


def test_example_workflow_runs_through_the_http_api(server):
    graph = _example_graph(server)
    entry = _run_fast(server, graph)
    outputs = entry["outputs"]
    save_nodes = [k for k, v in graph.items() if v["class_type"] == "SaveImage"]
    assert len(save_nodes) == 2
    for node_id in save_nodes:
        images = outputs.get(node_id, {}).get("images")
        assert images, f"SaveImage {node_id} produced no images: {outputs.get(node_id)}"
        for image in images:
            path = server.base / "output" / image.get("subfolder", "") / image["filename"]
            assert path.is_file(), f"{path} missing"
    report = " ".join(outputs.get("3", {}).get("text", []))
    assert "sites edited" in report, f"Closed-Form Erase ui text: {outputs.get('3')}"


def _report_branch(server):
    """The example's nodes feeding its report preview, and the id of its Load Concepts node."""
    example = _example_graph(server)
    report_node = next(k for k, v in example.items() if v["class_type"] == "PreviewAny")
    graph = _upstream(example, report_node)
    return graph, next(k for k, v in graph.items() if v["class_type"] == "CE_LoadConcepts")


def test_anchor_count_mismatch_is_rejected_at_queue_time(server):
    # Only the nodes feeding the report preview: every output then depends on Load Concepts, so
    # ComfyUI rejects the whole prompt instead of running the outputs that are still valid.
    graph, concepts = _report_branch(server)
    graph[concepts]["inputs"].update(targets="x; y; z", anchors="a; b", preserve="")

    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    assert status == 400, f"expected HTTP 400, got {status}: {body}"
    errors = body["node_errors"][concepts]["errors"]
    text = " ".join(f"{e.get('message', '')} {e.get('details', '')}" for e in errors)
    assert "Load Concepts" in text and "anchors" in text, errors


def test_load_concepts_lists_concept_files_and_its_preview_reaches_the_ui(server):
    options = _input_specs(server.get("/object_info/CE_LoadConcepts")["CE_LoadConcepts"])["file"]
    choices = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert {"none", "team_list.csv", "input/from_input.txt"} <= set(choices)

    graph, concepts = _report_branch(server)
    graph[concepts]["inputs"].update(targets="", anchors="", file="team_list.csv")
    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    assert status == 200, body
    history = _wait_for_history(server, body["prompt_id"])
    assert history["status"]["status_str"] == "success", history["status"]
    preview = " ".join(history["outputs"][concepts]["text"])
    assert "1 targets (1 artist), 1 preserved" in preview and "Vincent van Gogh (+1 aliases)" in preview


def test_apply_spm_example_shows_the_gate_on_the_node(server):
    path = Path(ROOT) / "example_workflows" / "apply_spm.json"
    graph = _example_graph(server, path)
    spm = next(k for k, v in graph.items() if v["class_type"] == "CE_ApplySPM")
    primitive = next(k for k, v in graph.items() if v["class_type"] == "PrimitiveStringMultiline")
    assert graph[spm]["inputs"]["prompt"] == [primitive, 0]  # the prompt is linked, not typed twice
    report = next(k for k, v in graph.items() if v["class_type"] == "PreviewAny")
    entry = _run_fast(server, _upstream(graph, report))
    text = " ".join(entry["outputs"][spm]["text"])
    assert "snoopy.safetensors: gate 1.000" in text and "tokenuni 1.000 vs 'snoopy'" in text, text


def test_apply_eraser_example_stacks_two_erasers_and_gates_the_second(server):
    path = Path(ROOT) / "example_workflows" / "apply_eraser.json"
    graph = _example_graph(server, path)
    erasers = sorted(k for k, v in graph.items() if v["class_type"] == "CE_ApplyEraserLoRA")
    primitive = next(k for k, v in graph.items() if v["class_type"] == "PrimitiveStringMultiline")
    first, second = (k for k in erasers if graph[k]["inputs"]["gate"] == "off"), \
        (k for k in erasers if graph[k]["inputs"]["gate"] != "off")
    first, second = next(first), next(second)
    assert graph[second]["inputs"]["model"] == [first, 0] and graph[second]["inputs"]["prompt"] == [primitive, 0]
    entry = _run_fast(server, graph)
    text1 = " ".join(entry["outputs"][first]["text"])
    text2 = " ".join(entry["outputs"][second]["text"])
    assert "esd_x_vangogh.safetensors: UNet weights, diffusers names" in text1 and "2 of 2 UNet weights" in text1
    assert "vangogh_lora.safetensors: kohya LoRA" in text2 and "vs 'Van Gogh'" in text2, text2
