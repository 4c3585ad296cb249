"""Every node's schema, read through the stub node API (and the real one when COMFYUI_PATH is set)."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from enum import Enum

import comfy_stubs
import pytest

from erasure_core import ClosedFormConfig

CONFIG_FIELDS = [f.name for f in dataclasses.fields(ClosedFormConfig)]


def _schemas(env):
    return [node.define_schema() for node in env.pack.nodes.NODES]


def _closed_form_inputs(env):
    schema = env.pack.nodes.closed_form_erase.ClosedFormErase.define_schema()
    return {w.id: w for w in schema.inputs}


def test_node_ids_are_prefixed_and_unique(env):
    ids = [s.node_id for s in _schemas(env)]
    assert all(i.startswith("CE_") for i in ids) and len(set(ids)) == len(ids) == 13


def test_every_node_has_a_description_and_the_pack_category(env):
    assert all(s.description and s.category.startswith("concept_erasure") for s in _schemas(env))


def test_every_input_and_output_has_a_tooltip(env):
    missing = [(s.node_id, sock.id or sock.display_name)
               for s in _schemas(env) for sock in [*s.inputs, *s.outputs] if not sock.tooltip]
    assert missing == []


@pytest.mark.parametrize("name", CONFIG_FIELDS)
def test_closed_form_widget_takes_default_range_and_help_from_the_core_config(env, name):
    field = next(f for f in dataclasses.fields(env.core.ClosedFormConfig) if f.name == name)
    widget = _closed_form_inputs(env)[name]
    default = field.default
    expected = {
        "default": default.value if isinstance(default, Enum) else default,
        "options": [m.value for m in type(default)] if isinstance(default, Enum) else None,
        "min": field.metadata["min"], "max": field.metadata["max"], "step": field.metadata["step"],
        "tooltip": field.metadata["help"],
    }
    got = {key: getattr(widget, key, None) for key in expected}
    assert got == expected


def test_method_combo_lists_the_registered_methods(env):
    assert _closed_form_inputs(env)["method"].options == env.core.methods.names()


def test_the_extension_registers_every_node_in_menu_order(env):
    extension = asyncio.run(env.pack.comfy_entrypoint())
    assert asyncio.run(extension.get_node_list()) == list(env.pack.nodes.NODES)


def test_leaving_the_stubs_restores_sys_modules():
    before = {name: sys.modules.get(name) for name in comfy_stubs.STUB_NAMES}
    with comfy_stubs.stubbed_pack():
        pass
    assert {name: sys.modules.get(name) for name in comfy_stubs.STUB_NAMES} == before
    assert [m for m in sys.modules if m.split(".")[0] == comfy_stubs.PACK_NAME] == []


def test_no_input_is_named_like_a_sampler_seed(env):
    """ComfyUI's frontend adds a 'control after generate' widget (randomize by default) to INT
    inputs named seed/noise_seed: an erasure must stay reproducible, so none of ours is."""
    names = {getattr(i, "id", None) for s in _schemas(env) for i in s.inputs}
    assert not names & {"seed", "noise_seed"}
