"""Issue #14 in the core: the heap BPE equals the textbook one, typed text and names are capped
before any tokenising, ambiguous concept syntax is refused naming the input, hostile concept
files are refused, and options refuse NaN."""

from __future__ import annotations

import random

import pytest
import torch

from erasure_core import ConceptError, ConfigError
from erasure_core.concept_text import MAX_TEXT_CHARS
from erasure_core.edit.linalg import anchored_right_multiplier
from erasure_core.errors import NumericalError
from erasure_core.formats.concept_files import assemble, load_concept_file
from erasure_core.methods.closed_form import ClosedFormConfig


def _textbook_bpe(tokenizer, word):
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(tokenizer.ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(parts, parts[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def test_the_heap_bpe_gives_the_textbook_merges(clip_tokenizer):
    rng = random.Random(0)
    words = ["vangogh", "aaaaaaaaaaa", "mississippi", "snoopy</w>"[:-4]]
    words += ["".join(rng.choice("abcdeeinorstlm") for _ in range(rng.randint(1, 24))) for _ in range(500)]
    for word in words:
        assert clip_tokenizer._bpe(word) == _textbook_bpe(clip_tokenizer, word), word


@pytest.mark.parametrize(("inputs", "blamed"), [
    ({"targets": "y" * (MAX_TEXT_CHARS + 1)}, "targets"),
    ({"targets": "cat", "preserve": "p" * (MAX_TEXT_CHARS + 1)}, "preserve"),
    ({"targets": "x" * 5000}, "targets"),
    ({"targets": "cat -> dog -> fish"}, "targets"),
    ({"targets": "[cat|dog]"}, "targets"),
    ({"targets": "cat", "preserve": "[a|b]"}, "preserve"),
    ({"targets": ","}, "targets"),
    ({"targets": "cat | ,"}, "targets"),
    ({"targets": "cat", "templates": "custom", "custom_templates": "a {name} of {}"}, "custom_templates"),
    ({"targets": "cat", "templates": "custom", "custom_templates": "a } of {}"}, "custom_templates"),
    ({"targets": "cat", "templates": "bogus"}, "templates"),
    ({"targets": "cat", "kind": "bogus"}, "kind"),
])
def test_ambiguous_or_oversized_text_is_refused_naming_the_input(inputs, blamed):
    with pytest.raises(ConceptError) as err:
        assemble(**inputs)
    assert err.value.input_name == blamed, str(err.value)


@pytest.mark.parametrize(("name", "text"), [
    ("ragged.csv", "target,anchor\ncat,dog,extra\n"),
    ("short.csv", "target,anchor,kind\ncat,dog\n"),
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    ("arrows.txt", "cat -> dog -> fish\n"),
])
def test_hostile_concept_files_are_refused_as_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConceptError) as err:
        load_concept_file(path)
    assert err.value.input_name == "file", str(err.value)


@pytest.mark.parametrize("name", ["erase_scale", "preserve_scale", "lamb"])
def test_a_nan_option_is_refused_by_its_own_name(name):
    with pytest.raises(ConfigError) as err:
        ClosedFormConfig(**{name: float("nan")})
    assert err.value.input_name == name


def test_the_solver_blames_the_option_that_is_wrong_not_lamb():
    g = torch.Generator().manual_seed(0)
    ce, ca, cp = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(2, 8, generator=g)
    with pytest.raises(NumericalError) as err:
        anchored_right_multiplier(ce, ca, cp, erase_scale=float("nan"), preserve_scale=0.1, lamb=0.5)
    assert err.value.input_name == "erase_scale"
    ce[0, 0] = float("inf")
    with pytest.raises(NumericalError) as err:
        anchored_right_multiplier(ce, ca, cp, erase_scale=1.0, preserve_scale=0.1, lamb=0.5)
    assert err.value.input_name == "clip"
