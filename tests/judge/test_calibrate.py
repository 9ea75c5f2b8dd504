"""Calibration numbers on small labelled sets whose kappa and rank correlation are known.

Cohen's kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the
agreement expected by chance from each rater's label frequencies.
"""

from __future__ import annotations

import pytest

from judge.calibrate import agreement, cohens_kappa, label_of, spearman


def test_kappa_of_a_small_binary_set_matches_the_formula_worked_by_hand() -> None:
    a = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    b = [1, 0, 0, 0, 1, 0, 1, 1, 1, 1]
    # 8 of 10 agree; each rater says 1 six times and 0 four times.
    observed = 8 / 10
    chance = (6 * 6 + 4 * 4) / (10 * 10)

    assert cohens_kappa(a, b) == pytest.approx((observed - chance) / (1 - chance))
    assert cohens_kappa(a, b) == pytest.approx(0.28 / 0.48)


def test_kappa_of_the_textbook_fifty_item_table_is_point_four() -> None:
    # Both yes 20, both no 15, a yes and b no 5, a no and b yes 10 (Wikipedia's example).
    a = ["yes"] * 20 + ["no"] * 15 + ["yes"] * 5 + ["no"] * 10
    b = ["yes"] * 20 + ["no"] * 15 + ["no"] * 5 + ["yes"] * 10

    assert cohens_kappa(a, b) == pytest.approx(0.4)


def test_kappa_is_one_for_full_agreement_and_minus_one_for_systematic_disagreement() -> None:
    assert cohens_kappa([0, 1, 2, 1], [0, 1, 2, 1]) == 1.0
    assert cohens_kappa(["pass"] * 4, ["pass"] * 4) == 1.0
    assert cohens_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_kappa_needs_two_equally_long_non_empty_lists() -> None:
    with pytest.raises(ValueError, match="equally long"):
        cohens_kappa([1, 0], [1])
    with pytest.raises(ValueError, match="non-empty"):
        cohens_kappa([], [])


def test_spearman_is_one_for_any_increasing_relation_and_minus_one_for_decreasing() -> None:
    assert spearman([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_is_undefined_for_too_few_or_constant_scores() -> None:
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2, 3], [0.5, 0.5, 0.5]) is None


def test_scores_become_labels_by_the_thresholds_they_reach() -> None:
    assert [label_of(s) for s in (0.0, 0.49, 0.5, 1.0)] == [0, 0, 1, 1]
    assert [label_of(s, (0.33, 0.66)) for s in (0.1, 0.5, 0.7)] == [0, 1, 2]


def test_agreement_with_numeric_human_scores() -> None:
    human = [0.9, 0.8, 0.2, 0.1, 0.6]
    judge = [0.85, 0.7, 0.3, 0.05, 0.55]

    result = agreement("task_completion", human, judge)

    assert result.name == "task_completion"
    assert result.n == 5
    assert result.spearman == pytest.approx(1.0)
    assert result.kappa == pytest.approx(1.0)
    assert result.accuracy == pytest.approx(1.0)
    assert result.mean_abs_error == pytest.approx((0.05 + 0.1 + 0.1 + 0.05 + 0.05) / 5)
    assert result.as_dict()["spearman"] == result.spearman


def test_agreement_with_pass_fail_labels() -> None:
    human = ["pass", "PASS", "fail", "Fail", "pass"]
    judge = [0.9, 0.4, 0.2, 0.6, 0.7]  # labels 1, 0, 0, 1, 1

    result = agreement("overall", human, judge)

    # 3 of 5 agree; both sides say pass 3 times: p_e = (3*3 + 2*2) / 25.
    chance = (3 * 3 + 2 * 2) / 25
    assert result.accuracy == pytest.approx(0.6)
    assert result.kappa == pytest.approx((0.6 - chance) / (1 - chance))
    assert result.spearman is None
    assert result.mean_abs_error is None


def test_boolean_human_labels_are_labels_not_scores() -> None:
    result = agreement("overall", [True, False, True, False], [0.8, 0.1, 0.9, 0.3])

    assert result.accuracy == 1.0
    assert result.kappa == pytest.approx(1.0)
    assert result.spearman is None
