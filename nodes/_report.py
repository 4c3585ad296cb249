"""What a node shows after it runs.

Every node returns ``ui=report_ui(...)``: the report text under ``text`` (what ComfyUI's Preview
Any and the log read) and a structured payload under ``ce_report`` that the front-end extension
(``web/js``) draws on the node. The payload is plain JSON:

``{"title": str, "lines": [str, ...], "bars": [{"label": str, "value": float | None, "limit": float,
"good": "low" | "high", "text": str}, ...]}``

``value`` is drawn as a bar filled to ``value / limit`` (clamped); ``good`` says which end is the
good one (``low``: a drift or a share of a gap left; ``high``: a gate that opened). A value that is
not finite is sent as ``None`` (JSON has no NaN) and drawn as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

UI_KEY = "ce_report"


@dataclass(frozen=True)
class Bar:
    """One measured number drawn as a bar on the node."""

    label: str
    value: float
    limit: float = 1.0
    good: str = "low"
    text: str = ""

    def as_json(self) -> dict[str, Any]:
        value = float(self.value)
        finite = math.isfinite(value)
        return {"label": self.label, "value": value if finite else None,
                "limit": float(self.limit) if math.isfinite(float(self.limit)) and self.limit > 0 else 1.0,
                "good": self.good if self.good in ("low", "high") else "low",
                "text": self.text or (f"{value:.3g}" if finite else "n/a")}


def report_ui(text: str, *, title: str, lines: Sequence[str] = (), bars: Sequence[Bar] = ()) -> dict[str, list]:
    """The ``ui`` dict of a node's output: ``text`` for Preview Any, ``ce_report`` for the node."""
    payload = {"title": title, "lines": [str(line) for line in lines] or [text],
               "bars": [bar.as_json() for bar in bars]}
    return {"text": [text], UI_KEY: [payload]}
