"""The check drawn as a bar chart (Pillow, which ComfyUI ships): an IMAGE that Preview Image and
Save Image take as they are, ``[1, H, W, 3]`` float32 in 0..1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH = 640
ROW = 18
LABEL = 250  # px for the prompt column
SCALE = 1.0  # the bars' full width: a share or drift of 1 (values above are clipped and marked)
GUIDE = 0.10  # the "erased" / "untouched" bound, drawn as a line
COLOURS = {"target": (214, 96, 77), "preserved": (77, 140, 214), "probe": (120, 170, 90)}


def _short(text: str, limit: int = 34) -> str:
    text = text or "(empty prompt)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_chart(title: str, groups: Sequence[tuple[str, str, Sequence[tuple[str, float]]]]) -> torch.Tensor:
    """``groups``: ``(kind, heading, [(prompt, value), ...])`` with kind in :data:`COLOURS`; each
    value is drawn as a bar from 0 to ``SCALE`` with the ``GUIDE`` line. Returns ``[1, H, W, 3]``."""
    font = ImageFont.load_default()
    rows = sum(1 + max(len(items), 1) for _, _, items in groups)
    height = 28 + rows * ROW + 22
    image = Image.new("RGB", (WIDTH, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=(20, 20, 20), font=font)
    left, right = LABEL, WIDTH - 60
    span = right - left
    y = 28
    for kind, heading, items in groups:
        draw.text((8, y + 3), heading, fill=(60, 60, 60), font=font)
        y += ROW
        if not items:
            draw.text((16, y + 3), "none", fill=(140, 140, 140), font=font)
            y += ROW
            continue
        for prompt, value in items:
            draw.text((16, y + 3), _short(prompt), fill=(30, 30, 30), font=font)
            draw.rectangle([left, y + 3, right, y + ROW - 3], fill=(230, 230, 230))
            if math.isfinite(value):
                end = left + int(span * min(max(value, 0.0), SCALE) / SCALE)
                draw.rectangle([left, y + 3, end, y + ROW - 3], fill=COLOURS.get(kind, (128, 128, 128)))
                shown = f"{value:.3f}" + ("+" if value > SCALE else "")
            else:
                shown = "n/a"
            draw.text((right + 6, y + 3), shown, fill=(30, 30, 30), font=font)
            y += ROW
    guide = left + int(span * GUIDE / SCALE)
    draw.line([guide, 28, guide, y], fill=(0, 0, 0), width=1)
    draw.text((left, y + 4), f"0 = best; line at {GUIDE:g}; bar end = {SCALE:g}", fill=(90, 90, 90), font=font)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, WIDTH, 3)
    return (pixels.float() / 255.0)[None]
