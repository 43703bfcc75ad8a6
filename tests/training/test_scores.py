"""Held-out answers' scores: exact match and word-position token accuracy, after whitespace and case normalization."""

from __future__ import annotations

import pytest

from mimo.training.scores import normalize, scores, token_accuracy


def test_normalization_ignores_case_and_runs_of_whitespace():
    assert normalize("  A Red\n\tCAT ") == "a red cat"
    assert scores([("  A Red\n CAT ", "a red cat")]) == {"exact_match": 1.0, "token_accuracy": 1.0}


def test_token_accuracy_counts_agreeing_word_positions_over_the_longer_text():
    assert token_accuracy("a red dog", "a red cat") == pytest.approx(2 / 3)
    assert token_accuracy("a red", "a red cat") == pytest.approx(2 / 3)  # a missing word costs
    assert token_accuracy("a red cat sat", "a red cat") == pytest.approx(3 / 4)  # so does an extra one
    assert token_accuracy("red a cat", "a red cat") == pytest.approx(1 / 3)  # by position, not as a bag
    assert token_accuracy("", "") == 1.0 and token_accuracy("", "cat") == 0.0
    got = scores([("a red dog", "a red cat"), ("seven", "Seven"), ("", "six")])
    assert got["exact_match"] == pytest.approx(1 / 3) and got["token_accuracy"] == pytest.approx((2 / 3 + 1) / 3)
