"""Every node's schema, against the real ComfyUI node API."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui

ALL_IDS = ["CE_LoadConcepts", "CE_MergeConcepts", "CE_SaveConcepts", "CE_ClosedFormErase", "CE_SaveErasure",
           "CE_UCEOptions", "CE_SPEEDOptions", "CE_RECEOptions", "CE_RealEraOptions", "CE_ApplySPM",
           "CE_ApplyEraserLoRA", "CE_ExtractEraser", "CE_AttackPrompt"]


def _schemas(pack):
    from concept_erasure_pack.nodes import NODES

    return [node.define_schema() for node in NODES]


def test_ids_are_prefixed_unique_and_in_the_pack_category(pack):
    schemas = _schemas(pack)
    ids = [s.node_id for s in schemas]
    assert ids == ALL_IDS and len(set(ids)) == len(ids)
    assert all(s.category.startswith("concept_erasure") and s.description for s in schemas)


def test_every_input_and_output_has_a_tooltip(pack):
    missing = [(s.node_id, getattr(io_, "id", None) or getattr(io_, "display_name", None))
               for s in _schemas(pack) for io_ in [*s.inputs, *s.outputs] if not io_.tooltip]
    assert missing == []


def test_every_node_has_a_docs_page(pack):
    import os

    from comfy_env import ROOT

    for s in _schemas(pack):
        assert os.path.exists(os.path.join(ROOT, "web", "docs", f"{s.node_id}.md")), s.node_id


def test_the_extension_registers_every_node(pack):
    import asyncio

    ext = asyncio.run(pack.comfy_entrypoint())
    assert [n.define_schema().node_id for n in asyncio.run(ext.get_node_list())] == ALL_IDS


def test_node_list_json_matches_the_registered_nodes(pack):
    """ComfyUI-Manager's scanner reads node ids from node_list.json (it cannot see V3 entrypoints)."""
    import json
    import os

    from comfy_env import ROOT

    with open(os.path.join(ROOT, "node_list.json")) as f:
        listed = json.load(f)
    assert listed == {s.node_id: s.display_name for s in _schemas(pack)}
