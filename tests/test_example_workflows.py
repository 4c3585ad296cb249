"""Every example workflow opens cleanly: no node lies on another (title width included), and each
has the thumbnail ComfyUI's template browser asks for. Pure JSON: runs without ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_layout import Rect, display_names, node_rects, overlapping_pairs, title_width

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_no_two_nodes_overlap(path):
    rects = node_rects(json.loads(path.read_text()), display_names(ROOT))
    assert not overlapping_pairs(rects), f"{path.name}: overlapping nodes {overlapping_pairs(rects)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_has_a_thumbnail_for_the_template_browser(path):
    # Frontend 1.27 asks for /api/workflow_templates/<pack>/<name>.jpg for a custom-node template.
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} missing: run tests/browser/make_thumbnails.py"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and 5_000 < len(data) < 300_000, f"{thumb.name} is not a small JPEG"


def test_the_overlap_check_catches_a_long_title():
    # A 320-wide node whose long title widens it over a neighbour 20 px to its right.
    title = "KSampler (erased model, attack conditioning, long)"
    assert title_width(title) > 340
    workflow = {"nodes": [
        {"id": 1, "type": "KSampler", "title": title, "pos": [0, 0], "size": [320, 100], "widgets_values": [1]},
        {"id": 2, "type": "VAEDecode", "pos": [340, 0], "size": [210, 50]}]}
    assert overlapping_pairs(node_rects(workflow, {})) == [("1 (" + title + ")", "2 (VAEDecode)")]
    assert not Rect("a", 0, 0, 10, 10).overlaps(Rect("b", 10, 0, 10, 10))  # touching is fine
