"""Statistics of benchmark samples: medians with a distribution-free 95 % confidence interval, latency
percentiles, and the Mann-Whitney U test that ``bench compare`` uses to tell a regression from noise.

No scipy: the intervals come from binomial order statistics and the test's p-value is exact (the U
distribution counted by dynamic programming) when the samples have no ties, a normal approximation with
tie correction otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no samples")
    middle = n // 2
    return ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_ci(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """An order-statistic interval that holds the median with at least ``confidence`` (any distribution).

    The number of samples below the median is Binomial(n, 1/2); the widest symmetric pair of order
    statistics whose coverage reaches ``confidence`` is returned. Under 6 samples no pair reaches 95 %:
    the interval is then the samples' range, which covers 1 - 2^(1-n) (e.g. 94 % for 5 samples)."""
    ordered = sorted(values)
    n = len(ordered)
    cdf, k = 0.0, 0
    # k = largest count with P(B <= k - 1) <= (1 - confidence) / 2: the interval is [x_(k), x_(n-k+1)] (1-based)
    while k < n:
        cdf_next = cdf + math.comb(n, k) / 2**n
        if cdf_next > (1 - confidence) / 2:
            break
        cdf, k = cdf_next, k + 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


@dataclass(frozen=True)
class Summary:
    median: float
    ci95: tuple[float, float]
    n: int

    def to_dict(self) -> dict:
        return {"median": self.median, "ci95": list(self.ci95), "n": self.n}


def summarize(values: list[float]) -> Summary:
    return Summary(median(values), median_ci(values), len(values))


def _ranks(values: list[float]) -> list[float]:
    """Ranks (1-based) with ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _exact_u_cdf(u: int, n1: int, n2: int) -> float:
    """P(U <= u) for sample sizes n1, n2 without ties: counts of n1-subsets of ranks by their U value."""
    # ways[i][j][s]: arrangements of i x's and j y's with U statistic s; only the last row is kept per i
    max_u = n1 * n2
    prev = [[1] + [0] * max_u for _ in range(n2 + 1)]  # i = 0: U is 0 for any j
    for _ in range(n1):
        row = [[0] * (max_u + 1) for _j in range(n2 + 1)]
        row[0][0] = 1
        for j in range(1, n2 + 1):
            # the largest element is an x (adds j to U) or a y (adds nothing)
            for s in range(max_u + 1):
                row[j][s] = (prev[j][s - j] if s >= j else 0) + row[j - 1][s]
        prev = row
    total = math.comb(n1 + n2, n1)
    return sum(prev[n2][: u + 1]) / total


def mann_whitney_less(x: list[float], y: list[float]) -> float:
    """One-sided p-value of the Mann-Whitney U test that ``x`` tends to be smaller than ``y``."""
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        raise ValueError("both samples need values")
    ranks = _ranks(list(x) + list(y))
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    if len(set(x) | set(y)) == n1 + n2 and n1 * n2 <= 10_000:
        return _exact_u_cdf(int(round(u)), n1, n2)
    n = n1 + n2
    counts: dict[float, int] = {}
    for v in list(x) + list(y):
        counts[v] = counts.get(v, 0) + 1
    tie = sum(t**3 - t for t in counts.values())
    variance = n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 + 0.5) / math.sqrt(variance)  # continuity correction toward the null
    return 0.5 * math.erfc(-z / math.sqrt(2))


def shift_estimate(x: list[float], y: list[float]) -> float:
    """Hodges-Lehmann estimate of y - x: the median of all pairwise differences."""
    return median([b - a for a in x for b in y])
