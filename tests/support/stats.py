"""Bounds for counts of random outcomes (a weighted split, injected faults, retried failures), chosen
so that a correct system falls outside them in about one run in a million: a test that checks a
percentage asserts the behaviour, and its flake rate is a number we picked, not a surprise."""

from __future__ import annotations

import math

TAIL = 1e-6  # the chance, per bound, that a correct system lands outside it


def _log_pmf(n: int, p: float, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_bounds(n: int, p: float, tail: float = TAIL) -> tuple[int, int]:
    """``(lo, hi)`` for X ~ Binomial(n, p): P(X < lo) <= tail and P(X > hi) <= tail, as tight as
    that allows. Exact (summed in log space), so it holds for small means too."""
    if not 0 <= p <= 1 or n < 0:
        raise ValueError(f"Binomial({n}, {p})")
    if p == 0:
        return 0, 0
    if p == 1:
        return n, n
    pmf = [math.exp(_log_pmf(n, p, k)) for k in range(n + 1)]
    lo, below = 0, 0.0
    while lo < n and below + pmf[lo] <= tail:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while hi > 0 and above + pmf[hi] <= tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def share_bounds(n: int, p: float, tail: float = TAIL) -> tuple[float, float]:
    """``binomial_bounds`` as fractions of ``n``."""
    lo, hi = binomial_bounds(n, p, tail)
    return lo / n, hi / n
