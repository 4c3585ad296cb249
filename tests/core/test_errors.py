"""How messages quote a user's or a file's text: cut, never copied whole."""

from __future__ import annotations

from erasure_core.errors import SHOWN_CHARS, shown, shown_list


def test_a_short_value_is_quoted_whole():
    assert shown("Van Gogh") == "'Van Gogh'" and shown(3) == "3"


def test_a_huge_string_is_cut_with_an_ellipsis_inside_its_quotes():
    text = shown("x" * 10_000_000)
    assert text.startswith("'xxx") and text.endswith("...'") and len(text) <= SHOWN_CHARS + 5


def test_a_long_non_string_is_cut_too():
    assert len(shown(list(range(10_000)))) == SHOWN_CHARS


def test_a_long_list_names_the_first_items_and_counts_the_rest():
    assert shown_list(["a", "b", "c"]) == "a, b, c"
    assert shown_list([str(i) for i in range(1000)], most=2) == "0, 1 and 998 more"
