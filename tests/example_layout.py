"""Where an example workflow's nodes lie on the canvas, as ComfyUI's front-end (1.27) sizes them.

On load the front-end widens every node to ``computeSize()``, whose width is at least the title's:
``NODE_TITLE_HEIGHT (30) + measureText(title, "14px Arial") + 0.33 * 30`` (litegraph
``LGraphNode.computeSize``), and at least ``NODE_WIDTH * 1.5 = 210`` for a node with widgets.
The title bar (30 px) sits above ``pos``. Text widths use Arial's advance widths (per 1000 em; the
same as Liberation Sans, which Chromium on Linux uses for Arial), so a title is measured as the
browser measures it; ``tools/make_thumbnails.py`` checks the real sizes in Chromium.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TITLE_HEIGHT = 30
TITLE_FONT_PX = 14
MIN_WIDTH_WITH_WIDGETS = 210
# Arial / Liberation Sans advance widths for printable ASCII, per 1000 em.
_ARIAL = dict(zip(
    " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~",
    (278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, *[556] * 10, 278, 278, 584,
     584, 584, 556, 1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, 667, 778, 722,
     667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, 333, 556, 556, 500, 556, 556, 278, 556, 556,
     222, 222, 500, 222, 833, 556, 556, 556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584),
    strict=True))
_WIDE = 1000  # any other character: a full em, an upper bound for Latin text


def text_width(text: str, size_px: float = TITLE_FONT_PX) -> float:
    return sum(_ARIAL.get(ch, _WIDE) for ch in text) * size_px / 1000.0


def title_width(title: str) -> float:
    """The width ``computeSize`` needs for ``title`` (litegraph: padLeft + text + padRight)."""
    return TITLE_HEIGHT + text_width(title) + 0.33 * TITLE_HEIGHT


@dataclass(frozen=True)
class Rect:
    node: str
    x: float
    y: float
    w: float
    h: float

    def overlaps(self, other: Rect) -> bool:
        return (self.x < other.x + other.w and other.x < self.x + self.w
                and self.y < other.y + other.h and other.y < self.y + self.h)


def display_names(root: Path) -> dict[str, str]:
    """Our node types' display names (node_list.json); a core node without a title is measured
    by its type name, which is never shorter than its display name in the examples."""
    return json.loads((root / "node_list.json").read_text())


def node_rects(workflow: dict, names: dict[str, str]) -> list[Rect]:
    """Each node's rectangle, title bar included, at least as wide as its title."""
    rects = []
    for node in workflow["nodes"]:
        title = node.get("title") or names.get(node["type"], node["type"])
        width = max(float(node["size"][0]), title_width(title))
        if node.get("widgets_values"):
            width = max(width, MIN_WIDTH_WITH_WIDGETS)
        rects.append(Rect(f"{node['id']} ({title})", float(node["pos"][0]), float(node["pos"][1]) - TITLE_HEIGHT,
                          width, float(node["size"][1]) + TITLE_HEIGHT))
    return rects


def overlapping_pairs(rects: list[Rect]) -> list[tuple[str, str]]:
    return [(a.node, b.node) for i, a in enumerate(rects) for b in rects[i + 1:] if a.overlaps(b)]
