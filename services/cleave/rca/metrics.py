"""Accuracy of rankings: AC@k (share of cases whose true root cause is in the top k) and
Avg@k (the mean of AC@1..AC@k), as in RCAEval and the anchors."""

from __future__ import annotations

from collections.abc import Sequence


def ac_at_k(rankings: Sequence[Sequence[str]], truths: Sequence[str], k: int) -> float:
    if len(rankings) != len(truths):
        raise ValueError("one ranking per truth")
    if not truths:
        return 0.0
    return sum(truth in list(ranking)[:k] for ranking, truth in zip(rankings, truths)) / len(truths)


def avg_at_k(rankings: Sequence[Sequence[str]], truths: Sequence[str], k: int = 5) -> float:
    return sum(ac_at_k(rankings, truths, i) for i in range(1, k + 1)) / k
