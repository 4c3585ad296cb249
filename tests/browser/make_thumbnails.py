"""Thumbnails (and a tidy layout) for every example workflow, made in ComfyUI's real front-end.

    COMFYUI_PATH=/path/to/ComfyUI NODE_PATH=/path/to/node_modules \\
        python tests/browser/make_thumbnails.py [--tidy] [--no-run] [NAME ...]

Starts a headless ComfyUI with its bundled front-end, this pack and the tiny test checkpoint
(tests/integration/tiny_sd15.py), then drives Debian's chromium with playwright-core
(tests/browser/thumbnails.cjs):

1. opens each example (all of example_workflows/*.json, or the NAMEs given) and runs it at 64x64,
   2 steps, so every CE_* node draws its report and grows to its real size (``--no-run`` skips
   this: faster, no reports on the nodes);
2. with ``--tidy``, rewrites each example's node positions so that nothing overlaps once the
   reports are drawn: nodes keep their columns (same x) and order; a column is pushed right of the
   widest node of the column before it, a node below the one above it (size as the front-end
   measures it, title included); sizes are stored as the front-end computes them on load;
3. opens each example again with the measured reports shown on the nodes, fits the view and saves
   ``example_workflows/<name>.jpg`` (512 px wide), the thumbnail ComfyUI's template browser asks
   for (``/api/workflow_templates/<pack>/<name>.jpg``).

Prints each example's nodes that the front-end resized on load and any overlap it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXAMPLES = ROOT / "example_workflows"
GAP_X, GAP_Y = 30, 30  # between a node's right edge and the next column; under a node's bottom edge
TITLE = 30
THUMB_WIDTH = 512


def _start(tmp: Path):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        sys.exit("set COMFYUI_PATH to a ComfyUI 0.3.64 tree")
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration"), comfy]
    from comfy.cli_args import args

    args.cpu = True
    import tiny_sd15
    from test_server import launch, prepare_base

    prepare_base(tmp, tiny_sd15.build_state_dict())
    spec = importlib.util.find_spec("comfyui_frontend_package")
    return launch(tmp, Path(spec.submodule_search_locations[0]) / "static")


def _node(url: str, out: Path, run: bool, reports: Path | None, files: list[Path]) -> dict:
    env = dict(os.environ)
    env["NODE_PATH"] = os.pathsep.join([*filter(None, env.get("NODE_PATH", "").split(os.pathsep)),
                                        str(ROOT / "node_modules")])
    cmd = ["node", str(HERE / "thumbnails.cjs"), url, str(out), "1" if run else "0",
           str(reports) if reports else "-", *map(str, files)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"thumbnails.cjs failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def tidy(workflow: dict, loaded: list[dict], grown: list[dict]) -> bool:
    """Move nodes so that their grown rectangles do not overlap; store the sizes as loaded."""
    size_loaded = {m["id"]: m["size"] for m in loaded}
    size_grown = {m["id"]: m["size"] for m in grown}
    nodes = workflow["nodes"]
    columns: dict[float, list[dict]] = {}
    for node in nodes:
        columns.setdefault(float(node["pos"][0]), []).append(node)
    changed, right = False, None
    for x in sorted(columns):
        column = sorted(columns[x], key=lambda n: n["pos"][1])
        new_x = x if right is None else max(x, right + GAP_X)
        bottom = None
        for node in column:
            y = float(node["pos"][1])
            if bottom is not None:
                y = max(y, bottom + GAP_Y + TITLE)
            pos = [round(new_x), round(y)]
            size = [round(v) for v in size_loaded[node["id"]]]
            size = [max(size[0], int(node["size"][0])), max(size[1], int(node["size"][1]))]
            changed |= pos != node["pos"] or size != node["size"]
            node["pos"], node["size"] = pos, size
            bottom = y + max(size_grown[node["id"]][1], size[1])
        widths = [max(size_grown[n["id"]][0], n["size"][0]) for n in column]
        right = new_x + max(widths)
    return changed


def _thumbnail(png: Path, jpg: Path) -> None:
    from PIL import Image

    image = Image.open(png).convert("RGB")
    height = round(image.height * THUMB_WIDTH / image.width)
    image.resize((THUMB_WIDTH, height), Image.LANCZOS).save(jpg, "JPEG", quality=82, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="example names (default: every example_workflows/*.json)")
    parser.add_argument("--tidy", action="store_true", help="rewrite node positions so nothing overlaps")
    parser.add_argument("--no-run", action="store_true", help="do not run the examples (no reports drawn)")
    opts = parser.parse_args()
    files = [EXAMPLES / f"{n}.json" for n in opts.names] or sorted(EXAMPLES.glob("*.json"))
    with tempfile.TemporaryDirectory(prefix="ce_thumbs_") as tmp_name:
        tmp = Path(tmp_name)
        shots = tmp / "shots"
        shots.mkdir()
        (tmp / "base").mkdir()
        with _start(tmp / "base") as srv:
            from test_browser import mark_returning_user

            mark_returning_user(srv.url)  # no getting-started flow replacing the loaded graph
            first = _node(srv.url, shots, not opts.no_run, None, files)
            reports = {name: {str(m["id"]): m["report"] for m in entry["after"] if m["report"]}
                       for name, entry in first.items()}
            for name, entry in first.items():
                if entry.get("status", "success") != "success":
                    print(f"{name}: the run ended with {entry['status']}")
                grown = [m for m in entry["before"] if m["size"] != next(
                    n["size"] for n in json.loads((EXAMPLES / f"{name}.json").read_text())["nodes"] if n["id"] == m["id"])]
                for m in grown:
                    print(f"{name}: node {m['id']} ({m['title']}) resized on load to {[round(v) for v in m['size']]}")
                if opts.tidy:
                    path = EXAMPLES / f"{name}.json"
                    workflow = json.loads(path.read_text())
                    if tidy(workflow, entry["before"], entry["after"]):
                        path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False))  # as the examples are written
                        print(f"{name}: layout tidied")
            (tmp / "reports.json").write_text(json.dumps(reports))
            final = _node(srv.url, shots, False, tmp / "reports.json", files)
        for name, entry in final.items():
            rects = [(m["id"], *m["rect"]) for m in entry["after"]]
            for i, a in enumerate(rects):
                for b in rects[i + 1:]:
                    if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]:
                        print(f"{name}: nodes {a[0]} and {b[0]} overlap in the front-end (reports drawn)")
            _thumbnail(shots / f"{name}.png", EXAMPLES / f"{name}.jpg")
            print(f"{name}: {EXAMPLES / f'{name}.jpg'} ({(EXAMPLES / f'{name}.jpg').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
