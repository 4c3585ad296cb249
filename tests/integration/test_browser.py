"""The front-end extension (web/js/ce_report.js) in headless Chromium against a real ComfyUI.

A module-scoped fixture runs ComfyUI with its bundled front-end (``comfyui_frontend_package``) and
this pack; ``tests/browser/check_report.cjs`` (playwright-core driving Debian's chromium) queues an
example from the page, as a user would, and reads what the extension drew on each CE_* node (the
strings it put on the canvas), after the run, after a reload, and with the extension's script
blocked. Needs COMFYUI_PATH, ``/usr/bin/chromium`` (or CHROMIUM) and ``playwright-core`` findable
by node (NODE_PATH or ./node_modules); skips with the reason otherwise (as in CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from comfy_env import ROOT
from test_server import Server, launch, prepare_base

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

BROWSER_DIR = Path(ROOT) / "tests" / "browser"
EXAMPLES = Path(ROOT) / "example_workflows"
SCRIPT_TIMEOUT_S = 900


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return path if os.path.exists(path) else None


def node_env() -> dict[str, str]:
    """The environment for node: NODE_PATH also holds ./node_modules of the repository."""
    env = dict(os.environ)
    paths = [p for p in env.get("NODE_PATH", "").split(os.pathsep) if p] + [str(Path(ROOT) / "node_modules")]
    env["NODE_PATH"] = os.pathsep.join(paths)
    return env


def browser_skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if chromium_path() is None:
        return "no chromium at /usr/bin/chromium (apt-get install chromium, or set CHROMIUM)"
    node = shutil.which("node")
    if node is None:
        return "node is not installed (the browser scripts run on node)"
    found = subprocess.run([node, "-e", "require.resolve('playwright-core')"], env=node_env(),
                           capture_output=True, timeout=60)
    if found.returncode != 0:
        return "playwright-core not found by node (npm install playwright-core, then set NODE_PATH to its node_modules)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui_frontend_package is not installed (ComfyUI's requirements.txt installs it)"
    return None


def mark_returning_user(url: str) -> None:
    """Settings of a user who has seen the getting-started flow (it would replace a loaded graph)."""
    req = urllib.request.Request(f"{url}/settings", data=json.dumps({"Comfy.TutorialCompleted": True}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as resp:
        assert resp.status == 200


def frontend_root() -> Path:
    spec = importlib.util.find_spec("comfyui_frontend_package")
    return Path(spec.submodule_search_locations[0]) / "static"


@pytest.fixture(scope="module")
def web_server(request, tmp_path_factory) -> Iterator[Server]:
    """ComfyUI serving its real front-end, with this pack and the tiny checkpoint."""
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)  # before the checkpoint is built
    base = tmp_path_factory.mktemp("comfy_web")
    prepare_base(base, request.getfixturevalue("tiny_state_dict"))
    with launch(base, frontend_root()) as srv:
        # A returning user: no getting-started flow replacing the graph the test loads.
        mark_returning_user(srv.url)
        yield srv


def run_node(script: str, *args: str) -> dict:
    proc = subprocess.run(["node", str(BROWSER_DIR / script), *args], env=node_env(), capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _by_type(state: dict, node_type: str) -> list[dict]:
    return [n for n in state["nodes"] if n["type"] == node_type]


def test_reports_are_drawn_on_the_nodes(web_server, tmp_path):
    shot = tmp_path / "attack_prompt.png"
    out = run_node("check_report.cjs", web_server.url, str(EXAMPLES / "attack_prompt.json"), str(shot))
    assert out["run"] == "success", f"{out}\nlog tail:\n{web_server.log_tail()}"
    state = out["after_run"]
    assert "concept_erasure.report" in state["extensions"]
    (erase,) = _by_type(state, "CE_ClosedFormErase")
    drawn = " ".join(erase["drawn"])
    assert "sites edited" in drawn, erase  # the report's numbers are on the canvas, not only in the payload
    for bar in erase["payload"]["bars"]:
        assert f"{bar['label']}: {bar['text']}" in erase["drawn"]
    (concepts,) = _by_type(state, "CE_LoadConcepts")
    assert "Vincent van Gogh" in " ".join(concepts["drawn"]), concepts
    (attack,) = _by_type(state, "CE_AttackPrompt")
    recovery = next(b for b in attack["payload"]["bars"] if b["label"] == "K/V recovery")
    assert recovery["good"] == "low" and recovery["value"] is not None
    assert f"K/V recovery: {recovery['text']}" in attack["drawn"], attack
    assert shot.stat().st_size > 10_000

    # A reload brings the last report back from the saved workflow.
    (reloaded,) = _by_type(out["after_reload"], "CE_ClosedFormErase")
    assert reloaded["drawn"] == erase["drawn"] and reloaded["size"][1] >= erase["size"][1] - 1

    # Without the extension's script nothing is drawn: this test would fail.
    blocked = out["without_extension"]
    assert "concept_erasure.report" not in blocked["extensions"]
    assert all(not n["drawn"] and n["payload"] is None for n in blocked["nodes"])


def test_template_browser_gets_every_thumbnail(web_server):
    # Frontend 1.27 (useTemplateWorkflows.getTemplateThumbnailUrl) asks for
    # api/workflow_templates/<pack folder>/<name>.jpg for a custom node's template.
    templates = web_server.get("/workflow_templates")
    names = sorted(templates.get("concept_erasure", []))
    assert names == sorted(p.stem for p in EXAMPLES.glob("*.json"))
    for name in names:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"{web_server.url}/api/workflow_templates/concept_erasure/{name}.jpg", timeout=30) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg", name
            assert resp.read()[:3] == b"\xff\xd8\xff"


def test_template_browser_shows_titles_and_thumbnails(web_server, tmp_path):
    # The category is named by locales/en/main.json; each card's title is the file name and its
    # description the name with spaces (what frontend 1.27 shows for a custom node's template).
    shot = tmp_path / "templates.png"
    cards = run_node("check_templates.cjs", web_server.url, "Concept Erasure", str(shot))
    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    ours = sorted((c for c in cards if c["name"] in names), key=lambda c: c["name"])
    assert [c["name"] for c in ours] == names, cards
    for card in ours:
        assert card["src"].endswith(f"/workflow_templates/concept_erasure/{card['name']}.jpg"), card
        assert card["status"] == 200 and card["shown"], f"thumbnail of {card['name']} not shown: {card}"
        assert card["title"] == card["name"] and card["description"] == card["name"].replace("_", " ")
