"""ConceptSet semantics: aliases, duplicates, conflicts, merging, source order, templates, lengths, summary."""

from __future__ import annotations

import pytest

from erasure_core import ConceptError, concepts
from erasure_core.concept_text import normalise
from erasure_core.concepts import Concept, ConceptKind, ConceptSet, check_prompt_lengths
from erasure_core.formats.concept_files import PRESET_DIR, assemble, load_preset

ARTIST = ConceptKind.ARTIST
OBJECT = ConceptKind.OBJECT
VAN_GOGH = Concept("Vincent van Gogh", "a painter", ("Van Gogh", "V. van Gogh"), ARTIST)


def words(text: str) -> int:
    return len(text.split())


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- aliases -------------------------------------------------------------------------------------

def test_each_alias_is_erased_toward_the_same_anchor():
    assert ConceptSet((VAN_GOGH,)).erase_pairs() == [
        ("Vincent van Gogh", "a painter"), ("Van Gogh", "a painter"), ("V. van Gogh", "a painter")]


def test_each_alias_is_templated_like_the_name():
    cs = ConceptSet((VAN_GOGH,), templates={"artist": ("art by {}",)})
    assert cs.erase_pairs() == [("art by Vincent van Gogh", "art by a painter"),
                                ("art by Van Gogh", "art by a painter"), ("art by V. van Gogh", "art by a painter")]


def test_alias_equal_to_the_anchor_is_refused():
    with pytest.raises(ConceptError, match="must differ from its anchor") as err:
        ConceptSet((Concept("Vincent van Gogh", "A  Painter", ("a painter",)),))
    assert err.value.input_name == "anchors"


def test_alias_repeating_the_name_is_dropped():
    assert Concept("Claude Monet", aliases=("claude monet", "Monet", "Monet")).aliases == ("Monet",)


# -- duplicates and conflicts --------------------------------------------------------------------

def test_same_name_in_other_case_and_spacing_is_merged_into_one_target():
    cs = ConceptSet((Concept("Claude Monet", "a painter"), Concept("  claude   MONET ", "a painter")))
    assert cs.target_names == ("Claude Monet",)


def test_merging_a_duplicate_target_is_reported_as_a_warning():
    cs = ConceptSet((Concept("Claude Monet", "a painter"), Concept("claude monet", "a painter")))
    assert cs.warnings == ("'claude monet' is listed twice in targets; merged into 'Claude Monet'.",)


def test_name_equal_to_another_entrys_alias_is_merged_into_that_entry():
    cs = ConceptSet((VAN_GOGH, Concept("van gogh", "a painter")))
    assert (cs.target_names, len(cs.warnings)) == (("Vincent van Gogh",), 1)


def test_alias_equal_to_another_entrys_name_joins_the_aliases():
    cs = ConceptSet((Concept("Van Gogh", "a painter"), Concept("Vincent van Gogh", "a painter", ("Van Gogh",))))
    assert cs.targets[0].names == ("Van Gogh", "Vincent van Gogh")


def test_duplicate_preserved_concepts_are_merged_with_a_warning():
    cs = ConceptSet((Concept("Dali"),), (Concept("Claude Monet"), Concept("claude monet")))
    assert (len(cs.preserve), cs.warnings) == (1, ("'claude monet' is listed twice in preserve; merged into "
                                                   "'Claude Monet'.",))


def test_same_target_with_two_anchors_is_refused_naming_both():
    with pytest.raises(ConceptError, match="'Monet' maps to 'a painter' and to 'an artist'") as err:
        ConceptSet((Concept("Claude Monet", "a painter", ("Monet",)), Concept("Monet", "an artist")))
    assert err.value.input_name == "anchors"


def test_typed_duplicate_with_two_anchors_is_refused():
    with pytest.raises(ConceptError, match="to one anchor only"):
        assemble(targets="Monet -> a painter\nmonet -> an artist")


def test_target_also_preserved_is_refused_naming_it():
    with pytest.raises(ConceptError, match=r"'monet' \(target 'Monet'\) is in both") as err:
        ConceptSet((Concept("Monet"),), (Concept("Turner"), Concept("monet")))
    assert err.value.input_name == "preserve"


def test_preserving_a_targets_alias_is_refused_naming_the_target():
    with pytest.raises(ConceptError, match=r"'Van Gogh' \(target 'Vincent van Gogh'\)") as err:
        ConceptSet((VAN_GOGH,), (Concept("Van Gogh"),))
    assert err.value.input_name == "preserve"


def test_require_targets_refuses_an_empty_set():
    with pytest.raises(ConceptError, match="at least one concept to erase") as err:
        ConceptSet(preserve=(Concept("Monet"),)).require_targets()
    assert err.value.input_name == "targets"


def test_require_targets_returns_a_set_with_targets():
    cs = ConceptSet((VAN_GOGH,))
    assert cs.require_targets() is cs


def test_assemble_with_nothing_to_erase_is_refused():
    with pytest.raises(ConceptError) as err:
        assemble(targets="# nothing\n", preserve="Monet")
    assert err.value.input_name == "targets"


def test_plain_strings_become_generic_concepts():
    assert ConceptSet(("Dali",), ("Monet",)) == ConceptSet((Concept("Dali"),), (Concept("Monet"),))


# -- templates -----------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["painting by", "{} and {}", "{0} painting"])
def test_template_needs_exactly_one_placeholder(template):
    with pytest.raises(ConceptError, match="exactly once") as err:
        ConceptSet((VAN_GOGH,), templates={"*": ("{}", template)})
    assert err.value.input_name == "templates"


def test_templates_keyed_by_an_unknown_kind_are_refused():
    with pytest.raises(ConceptError, match="keyed by kind") as err:
        ConceptSet((VAN_GOGH,), templates={"painter": ("{}",)})
    assert err.value.input_name == "templates"


def test_kind_specific_templates_win_over_the_any_kind_templates():
    cs = ConceptSet((VAN_GOGH, Concept("golden retriever", "a dog", kind=OBJECT)),
                    templates={"artist": ("art by {}",), "*": ("photo of {}",)})
    assert (cs.templates_for(ARTIST), cs.templates_for(OBJECT)) == (("art by {}",), ("photo of {}",))


def test_empty_anchor_stays_empty_under_templates():
    cs = assemble(targets='nudity -> ""', kind="explicit", templates="built-in per kind")
    assert {anchor for _, anchor in cs.erase_pairs()} == {""}


def test_preserve_prompts_are_templated_by_kind_with_aliases():
    cs = ConceptSet((VAN_GOGH,), (Concept("Claude Monet", aliases=("Monet",), kind=ARTIST),),
                    templates={"artist": ("art by {}",)})
    assert cs.preserve_prompts(["a cat"]) == ["art by Claude Monet", "art by Monet", "a cat"]


# -- merged() ------------------------------------------------------------------------------------

def test_merged_is_the_union_of_targets():
    a = ConceptSet((Concept("Dali", "a painter"),), (Concept("Turner"),))
    b = ConceptSet((Concept("golden retriever", "a dog"),), (Concept("a cat"),))
    assert a.merged(b).target_names == ("Dali", "golden retriever")


def test_merged_is_the_union_of_preserve():
    a = ConceptSet((Concept("Dali", "a painter"),), (Concept("Turner"),))
    b = ConceptSet((Concept("golden retriever", "a dog"),), (Concept("a cat"),))
    assert a.merged(b).preserve == (Concept("Turner"), Concept("a cat"))


def test_merged_keeps_the_first_sets_anchor_on_conflict():
    a = ConceptSet((Concept("Claude Monet", "a painter"),))
    b = ConceptSet((Concept("claude monet", "an artist"),))
    assert a.merged(b).anchors == ("a painter",)


def test_merged_reports_an_anchor_conflict_as_a_warning():
    a = ConceptSet((Concept("Claude Monet", "a painter"),))
    b = ConceptSet((Concept("claude monet", "an artist"),))
    assert any("'a painter'" in w and "'an artist'" in w and "kept 'a painter'" in w for w in a.merged(b).warnings)


def test_merged_adds_the_second_sets_aliases_to_a_shared_target():
    a = ConceptSet((Concept("Vincent van Gogh", "a painter"),))
    b = ConceptSet((Concept("Vincent van Gogh", "a painter", ("Van Gogh",)),))
    assert a.merged(b).targets[0].names == ("Vincent van Gogh", "Van Gogh")


@pytest.mark.parametrize("first_erases", [True, False])
def test_concept_erased_by_one_set_and_preserved_by_the_other_is_erased(first_erases):
    eraser = ConceptSet((Concept("Claude Monet", "a painter"),))
    keeper = ConceptSet((Concept("Dali", "a painter"),), (Concept("claude monet"), Concept("Turner")))
    merged = eraser.merged(keeper) if first_erases else keeper.merged(eraser)
    assert ("Claude Monet" in merged.target_names, [p.name for p in merged.preserve]) == (True, ["Turner"])


def test_concept_erased_by_one_set_and_preserved_by_the_other_is_a_warning():
    eraser = ConceptSet((Concept("Claude Monet", "a painter"),))
    keeper = ConceptSet((Concept("Dali", "a painter"),), (Concept("claude monet"),))
    assert any("'claude monet' is erased by one input and preserved by the other" in w
               for w in keeper.merged(eraser).warnings)


def test_merged_takes_templates_from_both_with_the_first_winning_per_kind():
    a = ConceptSet((VAN_GOGH,), templates={"artist": ("art by {}",)})
    b = ConceptSet((Concept("cat"),), templates={"artist": ("painting by {}",), "object": ("photo of {}",)})
    assert dict(a.merged(b).templates) == {"artist": ("art by {}",), "object": ("photo of {}",)}


def test_merged_keeps_the_warnings_of_both_sets():
    a = ConceptSet((Concept("Dali"), Concept("dali")))
    b = ConceptSet((Concept("Monet"), Concept("MONET")))
    assert len(a.merged(b).warnings) == 2


def test_merged_leaves_both_inputs_unchanged():
    a = ConceptSet((Concept("Claude Monet", "a painter"),))
    b = ConceptSet((Concept("Claude Monet", "a painter", ("Monet",)),))
    a.merged(b)
    assert (a.targets[0].aliases, b.targets[0].aliases) == ((), ("Monet",))


# -- assemble source order -----------------------------------------------------------------------

@pytest.fixture
def preset_target() -> Concept:
    if not PRESET_DIR.is_dir():
        pytest.skip("erasure_core/presets/ does not exist yet")
    return next(t for t in load_preset("artists").targets if t.anchor)


def test_typed_text_wins_over_a_file(tmp_path):
    path = _write(tmp_path, "f.txt", "Claude Monet -> an artist\n")
    assert assemble(targets="Claude Monet -> a painter", file=path).anchors == ("a painter",)


def test_file_wins_over_a_preset(tmp_path, preset_target):
    path = _write(tmp_path, "f.txt", f"{preset_target.name} -> someone else\n")
    cs = assemble(file=path, preset="artists")
    assert cs.targets[0].name == preset_target.name and cs.anchors[0] == "someone else"


def test_preset_wins_over_extra(preset_target):
    extra = ConceptSet((Concept(preset_target.name, "someone else"),))
    cs = assemble(preset="artists", extra=extra)
    assert dict(zip(cs.target_names, cs.anchors, strict=True))[preset_target.name] == preset_target.anchor


def test_typed_text_wins_over_extra():
    extra = ConceptSet((Concept("Claude Monet", "an artist"),))
    assert assemble(targets="Claude Monet -> a painter", extra=extra).anchors == ("a painter",)


def test_typed_target_removes_the_concept_from_a_presets_preserve_list():
    if not PRESET_DIR.is_dir():
        pytest.skip("erasure_core/presets/ does not exist yet")
    kept = load_preset("artists").preserve[0].name
    cs = assemble(targets=f"{kept} -> a painter", preset="artists")
    assert normalise(kept) not in {normalise(n) for p in cs.preserve for n in p.names}


def test_assemble_order_puts_typed_targets_first(tmp_path):
    path = _write(tmp_path, "f.txt", "Dali\n")
    extra = ConceptSet((Concept("Turner"),))
    assert assemble(targets="Claude Monet", file=path, extra=extra).target_names == ("Claude Monet", "Dali", "Turner")


# -- prompt lengths ------------------------------------------------------------------------------

def test_over_long_erase_prompt_is_refused_on_targets_with_its_length():
    cs = ConceptSet.simple(["one two three four"])
    with pytest.raises(ConceptError, match="'one two three four' is 4 tokens long") as err:
        check_prompt_lengths(cs, words, limit=3)
    assert err.value.input_name == "targets"


def test_over_long_anchor_is_refused_on_targets():
    cs = ConceptSet.simple(["Dali"], ["a very famous painter"])
    with pytest.raises(ConceptError, match="4 tokens") as err:
        check_prompt_lengths(cs, words, limit=3)
    assert err.value.input_name == "targets"


def test_over_long_preserve_prompt_is_refused_on_preserve():
    cs = ConceptSet.simple(["Dali"], preserve=["one two three four"])
    with pytest.raises(ConceptError, match="4 tokens") as err:
        check_prompt_lengths(cs, words, limit=3)
    assert err.value.input_name == "preserve"


def test_prompt_at_exactly_the_limit_passes():
    cs = ConceptSet.simple(["one two three"], ["a b c"], preserve=["x y z"])
    assert check_prompt_lengths(cs, words, limit=3) is None


def test_prompt_length_counts_the_templated_prompt():
    cs = ConceptSet.simple(["one two"], templates=["painting by {}"])
    with pytest.raises(ConceptError, match="'painting by one two' is 4 tokens"):
        check_prompt_lengths(cs, words, limit=3)


def test_default_limit_is_75_tokens():
    cs = ConceptSet.simple([" ".join(["w"] * 76)])
    with pytest.raises(ConceptError, match="75 usable tokens"):
        check_prompt_lengths(cs, words)


# -- summary -------------------------------------------------------------------------------------

def test_summary_counts_targets_per_kind():
    cs = ConceptSet((VAN_GOGH, Concept("Dali", "a painter", kind=ARTIST), Concept("cat", "an animal", kind=OBJECT)),
                    (Concept("Monet"),))
    assert cs.summary().splitlines()[0] == "3 targets (2 artist, 1 object), 1 preserved, 5 erase prompts"


def test_summary_shows_the_first_entries_with_aliases_and_anchors():
    cs = ConceptSet((VAN_GOGH, Concept("nudity")))
    assert "erase: Vincent van Gogh (+2 aliases) -> a painter; nudity -> (nothing)" in cs.summary()


def test_summary_shows_the_warnings():
    cs = ConceptSet((Concept("Dali"), Concept("dali")))
    assert "warning: 'dali' is listed twice in targets; merged into 'Dali'." in cs.summary().splitlines()


def test_summary_shows_the_count_beyond_the_first_five():
    cs = ConceptSet(tuple(Concept(f"artist {i}") for i in range(7)))
    assert cs.summary().splitlines()[1].endswith("artist 4 -> (nothing); ... 2 more")


def test_summary_hides_entries_beyond_the_first_five():
    cs = ConceptSet(tuple(Concept(f"artist {i}") for i in range(7)))
    assert "artist 5" not in cs.summary()


def test_summary_of_five_targets_has_no_more_marker():
    cs = ConceptSet(tuple(Concept(f"artist {i}") for i in range(5)))
    assert "more" not in cs.summary()


def test_a_long_overlap_of_targets_and_preserve_is_named_in_part_with_a_count():
    names = [f"Painter Number{i}" for i in range(1000)]
    with pytest.raises(ConceptError) as err:
        ConceptSet(tuple(Concept(n) for n in names), tuple(Concept(n) for n in names))
    message = str(err.value)
    shown = concepts.CLASHES_SHOWN
    assert f"'Painter Number{shown - 1}'" in message and f"'Painter Number{shown}'" not in message
    assert f"and {1000 - shown:,} more are in both" in message and len(message) < 600
