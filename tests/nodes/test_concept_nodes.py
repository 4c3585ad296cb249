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


# -- queue time: cheap whatever the file's size ---------------------------------------------------

def _validate(env, **inputs):
    widgets = {"targets": "", "anchors": "", "preserve": "", "kind": "generic", "preset": "none", "file": "none",
               "templates": "as given", "custom_templates": "", "preserve_set": "none"}
    return _nodes(env).LoadConcepts.validate_inputs(**(widgets | inputs))


def _list_ending_badly(names: int) -> str:
    """``names`` good lines, then a target that equals its anchor (refused once the file is read)."""
    return "".join(f"Painter Number{i} -> a painter\n" for i in range(names)) + "Cat -> cat\n"


def test_queue_time_reads_a_small_file_and_reports_its_error(env, concepts_dir):
    (concepts_dir / "small.txt").write_text(_list_ending_badly(10))
    message = _validate(env, file="small.txt")
    assert message.startswith("Load Concepts, ") and "must differ from its anchor" in message


def test_queue_time_leaves_a_large_file_to_the_run_and_still_checks_the_typed_inputs(env, concepts_dir):
    nodes = _nodes(env)
    text = _list_ending_badly(nodes.QUEUE_FILE_BYTES // 20)
    assert len(text.encode()) > nodes.QUEUE_FILE_BYTES
    (concepts_dir / "large.txt").write_text(text)
    assert _validate(env, file="large.txt") is True  # the error at its end is not looked for yet
    message = _validate(env, file="large.txt", targets="Van Gogh; Monet; Dali", anchors="a; b")
    assert message.startswith("Load Concepts, input 'anchors':")
    with pytest.raises(env.core.ConceptError, match="Load Concepts, .*must differ from its anchor"):
        _load(env, file="large.txt")  # the run reads it all


def test_queue_time_still_refuses_a_file_outside_the_allowed_folders(env, concepts_dir):
    (concepts_dir.parent / "secret.txt").write_text("Pikachu\n")
    assert "input 'file'" in _validate(env, file="../secret.txt")


# -- the prompt count: names x templates, refused before any prompt is built ----------------------

def test_queue_time_refuses_targets_times_custom_templates_over_the_limit_without_building_them(env, monkeypatch):
    limit = env.core.concepts.MAX_PROMPTS
    targets = "\n".join(f"t{i}" for i in range(limit // 100 + 1))
    templates = "\n".join(f"picture {i} of {{}}" for i in range(100))

    def refuse(template, name):
        raise AssertionError("a prompt was built")
    monkeypatch.setattr(env.core.concepts, "fill_template", refuse)
    message = _validate(env, targets=targets, templates="custom", custom_templates=templates)
    assert message.startswith("Load Concepts, input 'custom_templates': erase prompts") and f"{limit:,}" in message


def test_merge_concepts_refuses_two_sets_that_exceed_the_prompt_limit_together(env):
    limit = env.core.concepts.MAX_PROMPTS
    ten = "\n".join(f"art {i} {{}}" for i in range(10))
    (a,) = _load(env, targets="\n".join(f"a{i}" for i in range(limit // 20 + 1)), templates="custom",
                 custom_templates=ten).result
    (b,) = _load(env, targets="\n".join(f"b{i}" for i in range(limit // 20 + 1)), templates="custom",
                 custom_templates=ten).result  # each just over half the limit
    with pytest.raises(env.core.ConceptError, match="Merge Concepts, input 'concepts_b': erase prompts"):
        _nodes(env).MergeConcepts.execute(concepts_a=a, concepts_b=b)


def test_a_csv_cell_past_the_csv_limit_names_the_file_input(env, concepts_dir):
    (concepts_dir / "big.csv").write_text("target\nDali\n" + "a" * 200_000 + "\n")
    with pytest.raises(env.core.ConceptError, match="Load Concepts, input 'file': big.csv line 3: the CSV must be"):
        _load(env, file="big.csv")


def test_load_concepts_shows_five_warnings_and_counts_the_rest(env, concepts_dir):
    (concepts_dir / "dup.txt").write_text("".join(f"Artist {i % 10}\n" for i in range(3000)))
    out = _load(env, file="dup.txt")
    lines = out.ui["text"][0].splitlines()
    assert [line for line in lines if line.startswith("warning:")][-1] == (
        "warning: ... and 2,985 more (duplicates merged, conflicts resolved)")
    assert sum(line.startswith("warning:") for line in lines) == 6
