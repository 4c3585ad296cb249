"""The report payload every node sends to the browser: text for Preview Any, JSON for the node."""

from __future__ import annotations

import json
import math


def test_report_ui_has_text_and_a_json_payload(stub_env):
    report = stub_env.pack.nodes._report
    ui = report.report_ui("UCE on SD1.5: 32 sites", title="Closed-Form Erase",
                          bars=[report.Bar("cat: gap left", 0.02), report.Bar("probe drift", math.nan, limit=0.5)])
    assert ui["text"] == ["UCE on SD1.5: 32 sites"]
    (payload,) = ui[report.UI_KEY]
    assert payload["title"] == "Closed-Form Erase" and payload["lines"] == ["UCE on SD1.5: 32 sites"]
    assert payload["bars"][0] == {"label": "cat: gap left", "value": 0.02, "limit": 1.0, "good": "low",
                                  "text": "0.02"}
    assert payload["bars"][1]["value"] is None and payload["bars"][1]["text"] == "n/a"
    json.loads(json.dumps(ui, allow_nan=False))  # strict JSON: the browser's JSON.parse accepts it


def test_every_node_sends_the_payload(env):
    out = env.pack.nodes.load_concepts.LoadConcepts.execute(targets="Van Gogh", anchors="", preserve="")
    payload = out.ui[env.pack.nodes._report.UI_KEY][0]
    assert payload["title"] == "Load Concepts" and "Van Gogh" in " ".join(payload["lines"])
    assert out.ui["text"] == payload["lines"]
