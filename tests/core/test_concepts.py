from __future__ import annotations

import pytest

from erasure_core import ConceptError, ConceptSet, parse_anchor_list, parse_concept_list


def test_concepts_split_on_newlines_and_semicolons_not_commas():
    assert parse_concept_list("Van Gogh; Monet\n# a comment\n\na cat, sitting\nmonet") == (
        "Van Gogh", "Monet", "a cat, sitting")


def test_empty_anchor_entries_mean_the_empty_prompt():
    assert parse_anchor_list('a painter; ""') == ("a painter", "")


def test_single_anchor_is_broadcast_to_every_target():
    cs = ConceptSet.from_text("Van Gogh; Monet", "a painter")
    assert cs.anchors == ("a painter", "a painter")


def test_anchor_count_must_be_one_or_one_per_target():
    with pytest.raises(ConceptError, match=r"1 entry or one per target \(3\), but got 2") as err:
        ConceptSet.from_text("a; b; c", "x; y")
    assert err.value.input_name == "anchors"


def test_empty_targets_are_refused():
    with pytest.raises(ConceptError, match="at least one concept") as err:
        ConceptSet.from_text(" ;\n ")
    assert err.value.input_name == "targets"


def test_target_equal_to_its_anchor_is_refused_case_insensitively():
    with pytest.raises(ConceptError, match="must differ from its anchor"):
        ConceptSet.from_text("Van  Gogh", "van gogh")


def test_concept_both_erased_and_preserved_is_refused():
    with pytest.raises(ConceptError, match="both erased and preserved"):
        ConceptSet.from_text("Monet", "", "monet")


def test_templates_expand_targets_anchors_and_preserve_but_keep_the_null_anchor():
    cs = ConceptSet.simple(("Monet", "Dali"), ("a painter", ""), ("Turner",), ("art by {}", "{}"))
    assert cs.erase_pairs() == [("art by Monet", "art by a painter"), ("Monet", "a painter"),
                                ("art by Dali", ""), ("Dali", "")]
    assert cs.preserve_prompts([""]) == ["art by Turner", "Turner", ""]


def test_templates_need_exactly_one_placeholder():
    with pytest.raises(ConceptError, match="exactly once"):
        ConceptSet.simple(("a",), templates=("{} and {}",))


def test_error_names_the_node_when_a_node_attaches_it():
    with pytest.raises(ConceptError) as err:
        ConceptSet.from_text("")
    assert str(err.value.for_node("Load Concepts")).startswith("Load Concepts, input 'targets': needs")
