"""Load, Merge and Save Concepts as nodes: files in the registered folders, stubbed and real."""

from __future__ import annotations

import pytest


@pytest.fixture
def concepts_dir(env, model_folder):
    """models/concepts redirected to a temporary folder (the real registry is restored after)."""
    return model_folder(env.comfy["folder_paths"], "concepts", {".txt", ".csv", ".json"})


def _nodes(env):
    return env.pack.nodes.load_concepts


def _load(env, **inputs):
    return _nodes(env).LoadConcepts.execute(**({"targets": "", "anchors": "", "preserve": ""} | inputs))


def test_saved_concepts_are_listed_and_load_back_identically(env, concepts_dir):
    nodes = _nodes(env)
    (original,) = _load(env, targets="Vincent van Gogh | Van Gogh -> a painter", preserve="Claude Monet",
                        kind="artist", templates="built-in per kind").result
    (path,) = nodes.SaveConcepts.execute(concepts=original, filename="team", overwrite=False).result
    assert path == str(concepts_dir / "team.json")
    assert "team.json" in nodes.LoadConcepts.define_schema().inputs[5].options
    (loaded,) = _load(env, file="team.json").result
    assert loaded == original


def test_save_refuses_to_overwrite_unless_asked_and_keeps_the_file(env, concepts_dir):
    nodes = _nodes(env)
    (concepts,) = _load(env, targets="Pikachu").result
    (concepts_dir / "team.json").write_text("old")
    with pytest.raises(env.core.ConceptError, match="Save Concepts, input 'filename': .*exists"):
        nodes.SaveConcepts.execute(concepts=concepts, filename="team.json", overwrite=False)
    assert (concepts_dir / "team.json").read_text() == "old"
    nodes.SaveConcepts.execute(concepts=concepts, filename="team.json", overwrite=True)
    assert '"Pikachu"' in (concepts_dir / "team.json").read_text()


@pytest.mark.parametrize("name", ["../escape.json", "sub/dir.json", ""])
def test_save_refuses_names_with_folders(env, concepts_dir, name):
    (concepts,) = _load(env, targets="Pikachu").result
    with pytest.raises(env.core.ConceptError, match="input 'filename'"):
        _nodes(env).SaveConcepts.execute(concepts=concepts, filename=name, overwrite=True)
    assert list(concepts_dir.parent.glob("escape.json")) == []


def test_load_refuses_a_file_outside_the_allowed_folders(env, concepts_dir):
    (concepts_dir.parent / "secret.txt").write_text("Pikachu\n")
    with pytest.raises(env.core.ErasureError, match="Load Concepts, input 'file'"):
        _load(env, file="../secret.txt")


def test_a_csv_file_in_the_folder_loads_with_its_preview(env, concepts_dir):
    (concepts_dir / "list.csv").write_text("target,anchor,aliases,kind\nMickey Mouse,a cartoon mouse,Mickey,character\n")
    out = _load(env, file="list.csv")
    (concepts,) = out.result
    assert concepts.erase_pairs() == [("Mickey Mouse", "a cartoon mouse"), ("Mickey", "a cartoon mouse")]
    assert "1 targets (1 character)" in out.ui["text"][0]


def test_merge_concepts_unions_and_reports_conflicts(env):
    nodes = _nodes(env)
    (a,) = _load(env, targets="Van Gogh -> a painter", preserve="Rembrandt").result
    (b,) = _load(env, targets="Van Gogh -> an artist; Rembrandt -> a painter", preserve="Monet").result
    out = nodes.MergeConcepts.execute(concepts_a=a, concepts_b=b)
    (merged,) = out.result
    assert merged.target_names == ("Van Gogh", "Rembrandt") and merged.anchors == ("a painter", "a painter")
    assert [p.name for p in merged.preserve] == ["Monet"] and len(merged.warnings) == 2
