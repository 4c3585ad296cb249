"""Limits on what a concept set may grow to: the prompt count (names x templates), checked by
counting before any prompt is built, and the warnings a set carries to the node."""

from __future__ import annotations

import json

import pytest

from erasure_core import ConceptError, concepts
from erasure_core.concepts import BUILTIN_TEMPLATES, MAX_PROMPTS, Concept, ConceptKind, ConceptSet
from erasure_core.formats.concept_files import (
    FORMAT_NAME,
    assemble,
    list_preserve_sets,
    list_presets,
    load_preserve_set,
    load_preset,
)

OVER = MAX_PROMPTS // 100 + 1
"""Names that, under 100 templates, make just over :data:`MAX_PROMPTS` prompts."""
HUNDRED_TEMPLATES = "\n".join(f"picture {i} of {{}}" for i in range(100))


@pytest.fixture
def no_prompt_built(monkeypatch):
    """Fail the test if anything fills a template (the count is checked before any prompt exists)."""
    def refuse(template: str, name: str) -> str:
        raise AssertionError("a prompt was built")
    monkeypatch.setattr(concepts, "fill_template", refuse)


def _names(prefix: str, count: int) -> str:
    return "\n".join(f"{prefix}{i}" for i in range(count))


def test_typed_targets_times_custom_templates_over_the_limit_blame_custom_templates(no_prompt_built):
    with pytest.raises(ConceptError, match=f"erase prompts .* at most {MAX_PROMPTS:,}, but these concepts make "
                                           f"{OVER * 100:,} \\({OVER:,} names and aliases under up to 100 "
                                           "templates each\\)") as err:
        assemble(targets=_names("t", OVER), templates="custom", custom_templates=HUNDRED_TEMPLATES)
    assert err.value.input_name == "custom_templates"


def test_typed_preserve_times_custom_templates_over_the_limit_blame_custom_templates(no_prompt_built):
    with pytest.raises(ConceptError, match="preserve prompts .* at most") as err:
        assemble(targets="cat", preserve=_names("p", OVER), templates="custom", custom_templates=HUNDRED_TEMPLATES)
    assert err.value.input_name == "custom_templates"


def test_aliases_count_like_names(no_prompt_built):
    entries = "\n".join(f"t{i} | alias {i}" for i in range(OVER // 2 + 1))
    with pytest.raises(ConceptError, match="erase prompts") as err:
        assemble(targets=entries, templates="custom", custom_templates=HUNDRED_TEMPLATES)
    assert err.value.input_name == "custom_templates"


def test_the_same_lists_under_fewer_templates_pass():
    cs = assemble(targets=_names("t", OVER), preserve=_names("p", OVER), templates="custom",
                  custom_templates="\n".join(HUNDRED_TEMPLATES.splitlines()[:10]))
    assert cs.prompt_count("targets") == (OVER, OVER * 10) and len(cs.erase_pairs()) == OVER * 10


def test_builtin_templates_over_the_limit_blame_templates(no_prompt_built):
    count = MAX_PROMPTS // len(BUILTIN_TEMPLATES["artist"]) + 1
    with pytest.raises(ConceptError, match="erase prompts") as err:
        assemble(targets=_names("t", count), kind="artist", templates="built-in per kind")
    assert err.value.input_name == "templates"


def test_a_files_own_templates_over_the_limit_blame_templates_and_none_passes(tmp_path, no_prompt_built):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"format": FORMAT_NAME, "version": 1, "targets": [f"t{i}" for i in range(OVER)],
                                "templates": {"*": HUNDRED_TEMPLATES.splitlines()}}))
    with pytest.raises(ConceptError, match="erase prompts") as err:
        assemble(file=path)
    assert err.value.input_name == "templates"
    assert assemble(file=path, templates="none").prompt_count("targets") == (OVER, OVER)


def test_a_file_of_more_names_than_the_limit_blames_the_file(tmp_path, no_prompt_built):
    path = tmp_path / "list.txt"
    path.write_text(_names("t", MAX_PROMPTS + 1))
    with pytest.raises(ConceptError, match=f"but these concepts make {MAX_PROMPTS + 2:,}") as err:
        assemble(targets="cat", file=path)  # the typed target and the file's
    assert err.value.input_name == "file"


def test_a_file_preserving_more_names_than_the_limit_blames_the_file(tmp_path, no_prompt_built):
    path = tmp_path / "list.csv"
    path.write_text("preserve\n" + _names("p", MAX_PROMPTS + 1))
    with pytest.raises(ConceptError, match="preserve prompts") as err:
        assemble(targets="cat", file=path)
    assert err.value.input_name == "file"


def test_a_linked_set_of_more_names_than_the_limit_blames_the_concepts_input(no_prompt_built):
    extra = ConceptSet(tuple(Concept(f"t{i}") for i in range(MAX_PROMPTS + 1)))
    with pytest.raises(ConceptError, match="erase prompts") as err:
        assemble(targets="cat", extra=extra)
    assert err.value.input_name == "concepts"


def test_merging_two_sets_within_the_limit_is_refused_when_they_exceed_it_together(no_prompt_built):
    half = MAX_PROMPTS // 2 + 1
    a = ConceptSet(tuple(Concept(f"a{i}") for i in range(half)))
    b = ConceptSet(tuple(Concept(f"b{i}") for i in range(half)))
    with pytest.raises(ConceptError, match=f"erase prompts .* make {2 * half:,}") as err:
        a.merged(b)
    assert err.value.input_name == "targets"
    assert len(a.merged(b, check=False).targets) == 2 * half  # a caller that checks itself


def test_merging_preserve_lists_is_limited_too(no_prompt_built):
    half = MAX_PROMPTS // 2 + 1
    a = ConceptSet(preserve=tuple(Concept(f"a{i}") for i in range(half)))
    b = ConceptSet(preserve=tuple(Concept(f"b{i}") for i in range(half)))
    with pytest.raises(ConceptError, match="preserve prompts") as err:
        a.merged(b)
    assert err.value.input_name == "preserve"


def test_a_set_over_the_limit_builds_no_prompt(no_prompt_built):
    templates = {"*": tuple(HUNDRED_TEMPLATES.splitlines())}
    cs = ConceptSet(tuple(Concept(f"t{i}") for i in range(OVER)), (), templates)  # built directly: no check
    with pytest.raises(ConceptError, match="erase prompts"):
        cs.erase_pairs()
    cs = ConceptSet((Concept("cat"),), tuple(Concept(f"p{i}") for i in range(OVER)), templates)
    with pytest.raises(ConceptError, match="preserve prompts"):
        cs.preserve_prompts()


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_under_builtin_templates_stays_well_below_the_limit(name):
    cs = assemble(preset=name, templates="built-in per kind")
    assert max(cs.prompt_count("targets")[1], cs.prompt_count("preserve")[1]) < MAX_PROMPTS // 10
    assert load_preset(name).prompt_count("targets")[1] < MAX_PROMPTS // 10


@pytest.mark.parametrize("name", list_preserve_sets())
def test_every_preserve_set_under_builtin_templates_stays_well_below_the_limit(name):
    cs = assemble(targets="cat", preserve_set=name, templates="built-in per kind", kind=ConceptKind.OBJECT)
    assert cs.prompt_count("preserve")[1] < MAX_PROMPTS // 4
    assert len(load_preserve_set(name).preserve) > 100


# -- messages quote a file's or a user's text cut short, whatever its size -------------------------

HUGE = "x" * 1_000_000


def _doc(**fields) -> str:
    return json.dumps({"format": FORMAT_NAME, "version": 1, **fields})


@pytest.mark.parametrize("name, text", [
    ("v.json", _doc(version=HUGE)),
    ("vd.json", _doc(version={HUGE: 1})),
    ("vn.json", _doc()[:-1] + ', "name": 1' + "0" * 5000 + "}"),  # past Python's 4,300-digit int limit
    ("f.json", json.dumps({"format": HUGE})),
    ("fd.json", json.dumps({"format": [HUGE] * 3})),
    ("k.json", _doc(targets=["a"], **{f"key{i}": 1 for i in range(10_000)}, **{HUGE: 1})),
    ("e.json", _doc(targets=[{"name": "a", "bogus": HUGE}])),
    ("ed.json", _doc(targets=[{"name": "a", **{HUGE + str(i): 1 for i in range(3)}}])),
    ("a.json", _doc(targets=[{"name": "a", "anchor": [HUGE]}])),
    ("ad.json", _doc(targets=[{"name": "a", "anchor": {HUGE: HUGE}}])),
    ("kind.json", _doc(targets=[{"name": "a", "kind": HUGE}])),
    ("tk.json", _doc(targets=["a"], templates={HUGE: ["{}"]})),
    ("h.csv", ",".join(["c" * 100_000] + [f"col{i}" for i in range(10_000)]) + "\nDali\n"),
    ("kind.csv", "target,kind\nDali," + "k" * 100_000 + "\n"),
    ("arrows.txt", HUGE + " -> a -> b\n"),
    ("noname.txt", "| " + HUGE + "\n"),
    ("alternation.txt", "[a|b] " + HUGE + "\n"),
    ("separators.txt", "," * 900 + "\n"),
    ("clash.json", _doc(targets=[{"name": "a" * 900, "anchor": "b" * 900}, {"name": "A" * 900, "anchor": "c" * 900}])),
], ids=lambda v: v if len(v) < 40 else "")
def test_a_file_error_quotes_its_text_cut_short(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConceptError) as err:
        assemble(file=path)
    assert err.value.input_name == "file" and len(str(err.value)) < 700, str(err.value)[:2000]


@pytest.mark.parametrize("inputs, input_name", [
    ({"targets": "cat", "preserve": "dog -> " + "x" * 40_000}, "preserve"),
    ({"targets": "cat", "templates": "custom", "custom_templates": "{} " + "{" * 40_000}, "custom_templates"),
    ({"targets": "a" * 900 + " -> " + "b" * 900 + "\n" + "A" * 900 + " -> " + "c" * 900}, "anchors"),
    ({"targets": "a" * 900 + " -> " + "a" * 900}, "anchors"),
    ({"targets": "a" * 900, "preserve": "A" * 900}, "preserve"),
    ({"targets": "cat", "preset": "x" * 100_000}, "preset"),
    ({"targets": "cat", "preserve_set": "x" * 100_000}, "preserve_set"),
])
def test_a_typed_error_quotes_the_text_cut_short(inputs, input_name):
    with pytest.raises(ConceptError) as err:
        assemble(**inputs)
    assert err.value.input_name == input_name and len(str(err.value)) < 700, str(err.value)[:2000]


def _counted(monkeypatch, name):
    """The values every call of ``concepts.<name>`` gets (the function still runs)."""
    values = []
    real = getattr(concepts, name)

    def counting(value, *args):
        values.append(value)
        return real(value, *args)
    monkeypatch.setattr(concepts, name, counting)
    return values


@pytest.fixture
def formatted(monkeypatch):
    """Every value ``concepts`` quotes in a message or warning."""
    return _counted(monkeypatch, "shown")


@pytest.fixture
def checked(monkeypatch):
    """Every name ``concepts`` checks (``check_name``)."""
    return _counted(monkeypatch, "check_name")


def test_a_long_erased_and_preserved_overlap_formats_only_the_names_it_shows(formatted):
    names = tuple(Concept(f"n{i}") for i in range(50_000))
    with pytest.raises(ConceptError, match="and 49,995 more are in both"):
        ConceptSet(names, names)
    assert len(formatted) <= 2 * concepts.CLASHES_SHOWN


# -- warnings: the first few kept, the rest counted -------------------------------------------------

def test_a_file_repeating_a_name_keeps_five_warnings_and_counts_the_rest(tmp_path, formatted):
    path = tmp_path / "dup.txt"
    path.write_text("Dali\n" * 20_000)
    cs = assemble(file=path)
    assert (cs.target_names, len(cs.warnings), cs.warnings_left_out) == (("Dali",), 1, 19_998)
    assert len(formatted) <= 2 * concepts.WARNINGS_KEPT  # the rest are counted, never formatted
    lines = cs.summary().splitlines()
    assert lines[-1] == "warning: ... and 19,998 more (duplicates merged, conflicts resolved)" and len(lines) == 4


def test_distinct_warnings_past_the_first_five_are_counted():
    cs = ConceptSet(tuple(Concept(n) for i in range(8) for n in (f"artist {i}", f"ARTIST {i}")))
    assert (len(cs.warnings), cs.warnings_left_out) == (concepts.WARNINGS_KEPT, 8 - concepts.WARNINGS_KEPT)
    assert cs.warnings[0] == "'ARTIST 0' is listed twice in targets; merged into 'artist 0'."
    assert len(cs.summary().splitlines()) == 2 + concepts.WARNINGS_KEPT + 1


def test_merged_keeps_five_warnings_and_adds_up_the_counts():
    a = ConceptSet(tuple(Concept(n) for i in range(7) for n in (f"a{i}", f"A{i}")))
    b = ConceptSet(tuple(Concept(n) for i in range(9) for n in (f"b{i}", f"B{i}")), (Concept("a0"),))
    merged = a.merged(b)  # 7 + 9 duplicates and one concept erased by a, preserved by b
    assert (len(merged.warnings), merged.warnings_left_out) == (concepts.WARNINGS_KEPT, 7 + 9 + 1 - 5)
    assert merged.warnings == a.warnings


def test_a_set_without_duplicates_has_no_warning_count():
    cs = ConceptSet((Concept("Dali"), Concept("Monet")))
    assert (cs.warnings, cs.warnings_left_out) == ((), 0) and "warning" not in cs.summary()


# -- folding duplicates: linear in the names ---------------------------------------------------------

@pytest.mark.parametrize("role", ["targets", "preserve"])
def test_folding_many_aliases_into_one_entry_checks_each_name_a_bounded_number_of_times(checked, role):
    entries = [Concept("Dali", aliases=(f"alias {i}",)) for i in range(2000)]  # 'Dali | alias i' per line
    cs = ConceptSet(**{role: tuple(entries)})
    assert len(getattr(cs, role)[0].aliases) == 2000
    assert len(checked) < 10 * 2000  # rebuilding the concept per fold checked ~2,000,000 names


def test_merging_sets_folds_shared_targets_in_linear_time(checked):
    a = ConceptSet((Concept("Dali", "x", tuple(f"a{i}" for i in range(1000))),))
    b = ConceptSet(tuple(Concept(f"a{i}", "x", (f"b{i}",)) for i in range(1000)))  # each folds into Dali
    merged = a.merged(b)
    assert merged.target_names == ("Dali",) and len(merged.targets[0].aliases) == 2000
    assert len(checked) < 10 * 2000
