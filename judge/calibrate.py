"""Calibration: how far to trust a judge, from its agreement with human labels or scores."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import spearmanr


def cohens_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Agreement beyond chance between two raters over the same items.

    Written out because scipy has no kappa and the formula is four lines; a library
    for it (scikit-learn, statsmodels) would weigh more than this whole package.
    """
    if len(a) != len(b) or not a:
        raise ValueError("kappa needs two equally long, non-empty label lists")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    if expected == 1:
        return 1.0
    return (observed - expected) / (1 - expected)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def label_of(score: float, thresholds: Sequence[float] = (0.5,)) -> int:
    """A score as a label: how many thresholds it reaches (0.5 → 0 below, 1 at or above)."""
    return sum(score >= t for t in thresholds)


@dataclass
class Agreement:
    name: str
    n: int
    spearman: float | None = None
    kappa: float | None = None
    accuracy: float | None = None
    mean_abs_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def agreement(
    name: str,
    human: Sequence[Any],
    judge: Sequence[float],
    *,
    thresholds: Sequence[float] = (0.5,),
) -> Agreement:
    """Spearman for numeric human scores; kappa and accuracy on labels either way."""
    numeric = all(isinstance(h, int | float) and not isinstance(h, bool) for h in human)
    judge_labels = [label_of(j, thresholds) for j in judge]
    if numeric:
        human_labels = [label_of(float(h), thresholds) for h in human]
        rho = spearman([float(h) for h in human], list(judge))
        mae = sum(abs(float(h) - j) for h, j in zip(human, judge, strict=True)) / len(judge)
    else:
        # Labels such as pass/fail: map the two sides onto the judge's labels by order.
        mapping = {"fail": 0, "bad": 0, "false": 0, "0": 0, "pass": 1, "good": 1, "true": 1, "1": 1}
        human_labels = [mapping.get(str(h).lower(), h) for h in human]
        rho, mae = None, None
    matches = sum(h == j for h, j in zip(human_labels, judge_labels, strict=True))
    return Agreement(
        name=name,
        n=len(judge),
        spearman=rho,
        kappa=cohens_kappa(human_labels, judge_labels),
        accuracy=matches / len(judge),
        mean_abs_error=mae,
    )
