"""Facilitated Transport gate against hand computations on fixed embeddings and token ids."""

from __future__ import annotations

import math

import pytest
import torch

from erasure_core.errors import ConfigError
from erasure_core.gating.ft_gate import METRICS, clipcos, ft_gate, tokenuni

START, END = 49406, 49407
SPECIAL = {START, END}


def test_clipcos_is_the_cosine_of_the_flattened_sequences():
    # prompt [2 tokens x 2 dims] flattened: (1, 0, 0, 1); targets flattened (1, 0, 0, 0), (0, 1, 1, 0), (2, 0, 0, 2)
    prompt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],
                            [[0.0, 1.0], [1.0, 0.0]],
                            [[2.0, 0.0], [0.0, 2.0]]])
    got = clipcos(prompt, targets)
    # 1 / (sqrt 2 * 1), 0, 4 / (sqrt 2 * sqrt 8) = 1
    assert got.tolist() == pytest.approx([1 / math.sqrt(2), 0.0, 1.0])
    assert clipcos(prompt, targets[0]).tolist() == pytest.approx([1 / math.sqrt(2)])


def test_clipcos_is_not_the_mean_of_per_token_cosines():
    prompt = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    # flattened: (3,0,0,1).(3,0,1,0) = 9; norms sqrt(10), sqrt(10) -> 0.9 ; per-token mean would be 0.5
    assert clipcos(prompt, target).item() == pytest.approx(0.9)


def test_tokenuni_counts_distinct_target_tokens_found_in_the_prompt_without_specials():
    prompt = [START, 10, 11, 12, 11, END, END, END]
    targets = [[START, 11, 13, END, END, END, END, END],  # {11, 13}: 11 shared -> 1/2
               [START, 10, 12, 12, END, END, END, END],  # {10, 12}: both -> 1
               [START, 20, END, END, END, END, END, END],  # {20}: none -> 0
               [START, END, END, END, END, END, END, END]]  # no ordinary token -> 0 (not a division by zero)
    assert tokenuni(prompt, targets, SPECIAL).tolist() == [0.5, 1.0, 0.0, 0.0]
    # without removing specials, START and END would count as shared tokens
    assert tokenuni(prompt, targets[:1], set()).tolist() == [pytest.approx(3 / 4)]
    # negative ids (embedding vectors) are no tokens
    assert tokenuni([START, -1, 11, END], [[START, -1, 11, 14, END]], SPECIAL).tolist() == [0.5]


def test_gate_is_the_max_over_targets_of_the_max_of_both_metrics_times_the_factor():
    prompt_h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target_h = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],    # clipcos 0.7071
                             [[0.0, 1.0], [1.0, 0.0]]])   # clipcos 0
    prompt_ids = [START, 5, 6, END]
    target_ids = [[START, 7, END, END],                   # tokenuni 0
                  [START, 5, 8, END]]                     # tokenuni 0.5
    g = ft_gate(prompt_h, prompt_ids, target_h, target_ids, SPECIAL)
    # per target: max(0.7071, 0) = 0.7071 ; max(0, 0.5) = 0.5 ; max over targets = 0.7071 (target 0)
    assert g.raw == pytest.approx(1 / math.sqrt(2))
    assert g.gate == pytest.approx(1 / math.sqrt(2))
    assert g.best == 0
    assert g.score == pytest.approx((1 / math.sqrt(2), 0.5))
    assert g.clipcos == pytest.approx((1 / math.sqrt(2), 0.0))
    assert g.tokenuni == pytest.approx((0.0, 0.5))

    halved = ft_gate(prompt_h, prompt_ids, target_h, target_ids, SPECIAL, facilitate_factor=0.5)
    assert halved.gate == pytest.approx(0.5 / math.sqrt(2)) and halved.raw == pytest.approx(g.raw)

    # tokenuni wins when the prompt contains every token of a target
    full = ft_gate(prompt_h, [START, 5, 8, END], target_h, target_ids, SPECIAL)
    assert full.gate == pytest.approx(1.0) and full.best == 1
    assert "gate 1.000" in full.describe(["a", "b"]) and "vs 'b'" in full.describe(["a", "b"])


def test_single_metrics_ignore_the_other_part():
    prompt_h = torch.tensor([[1.0, 0.0]])
    target_h = torch.tensor([[[0.0, 1.0]]])
    only_cos = ft_gate(prompt_h, None, target_h, None, metric="clipcos")
    assert only_cos.gate == pytest.approx(0.0) and only_cos.tokenuni is None
    only_uni = ft_gate(None, [START, 3, END], None, [[START, 3, END]], SPECIAL, metric="tokenuni")
    assert only_uni.gate == pytest.approx(1.0) and only_uni.clipcos is None
    assert set(METRICS) == {"clipcos_tokenuni", "clipcos", "tokenuni"}


def test_identical_prompt_gives_gate_one():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(77, 16, generator=gen)
    ids = [START, 100, 200, END] + [END] * 73
    g = ft_gate(h, ids, h.unsqueeze(0), [ids], SPECIAL)
    assert g.gate == pytest.approx(1.0)


def test_bad_inputs_are_refused_with_the_input_named():
    with pytest.raises(ConfigError, match="metric") as err:
        ft_gate(None, [1], None, [[1]], metric="cosine")
    assert err.value.input_name == "metric"
    with pytest.raises(ConfigError, match="same T and D"):
        clipcos(torch.zeros(77, 8), torch.zeros(1, 154, 8))
    with pytest.raises(ConfigError, match="hidden states"):
        ft_gate(None, [1], None, [[1]])
    with pytest.raises(ConfigError, match="at least one target"):
        ft_gate(None, [1], None, [], metric="tokenuni")
    with pytest.raises(ConfigError, match="finite"):
        ft_gate(None, [1], None, [[1]], metric="tokenuni", facilitate_factor=float("nan"))


def test_gate_concepts_are_distinct_and_limited():
    from erasure_core.errors import ConceptError
    from erasure_core.gating.ft_gate import MAX_GATE_CONCEPTS, gate_concepts

    assert gate_concepts(["snoopy", "mickey", "snoopy"] * 10_000, "x", "x", "fix") == ("snoopy", "mickey")
    at_limit = [f"concept {i}" for i in range(MAX_GATE_CONCEPTS)]
    assert len(gate_concepts(at_limit, "x", "x", "fix")) == MAX_GATE_CONCEPTS
    with pytest.raises(ConceptError, match=r"at most 1,024, but the file lists 100,000 distinct concepts "
                                           r"\('c0', 'c1', 'c2', 'c3', 'c4' and 99,995 more\)\. Fix it\.") as err:
        gate_concepts([f"c{i}" for i in range(100_000)], "eraser", "the file", "Fix it.")
    assert err.value.input_name == "eraser" and len(str(err.value)) < 300
    with pytest.raises(ConceptError) as err:
        gate_concepts(["y" * 10_000 + str(i) for i in range(MAX_GATE_CONCEPTS + 1)], "x", "x", "fix")
    assert len(str(err.value)) < 600  # each named concept cut to 60 characters


def test_the_report_quotes_a_long_target_short():
    full = ft_gate(None, [START, 7, END], None, [[START, 7, END]], SPECIAL, metric="tokenuni")
    long = "snoopy " * 1000
    text = full.describe([long])
    assert len(text) < 120 and text.endswith("...')") and "vs 'snoopy snoopy" in text
