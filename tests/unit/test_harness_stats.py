"""The bounds statistical tests use: exact binomial tails."""

from __future__ import annotations

import math

import pytest

from tests.support.stats import binomial_bounds, share_bounds


def _cdf(n: int, p: float, k: int) -> float:
    """P(X <= k), by the textbook sum."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(("n", "p", "tail"), [(10, 0.5, 0.05), (1000, 0.3**5, 1e-6), (200, 0.9, 1e-3), (50, 0.02, 1e-4)])
def test_bounds_are_the_tightest_with_at_most_tail_outside(n: int, p: float, tail: float) -> None:
    lo, hi = binomial_bounds(n, p, tail)
    below = _cdf(n, p, lo - 1) if lo > 0 else 0.0
    above = 1 - _cdf(n, p, hi)
    assert below <= tail and above <= tail * (1 + 1e-9)
    # One step tighter would put more than ``tail`` outside.
    assert _cdf(n, p, lo) > tail
    assert 1 - _cdf(n, p, hi - 1) > tail


def test_known_values_and_edges() -> None:
    assert binomial_bounds(10, 0.5, 0.05) == (2, 8)  # P(X <= 1) = 11/1024; P(X <= 2) = 56/1024
    assert binomial_bounds(5, 0.0) == (0, 0) and binomial_bounds(5, 1.0) == (5, 5)
    assert share_bounds(1000, 0.25) == (0.187, 0.317)
    with pytest.raises(ValueError):
        binomial_bounds(10, 1.5)
