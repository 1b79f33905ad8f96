"""The sign-test interval ``benchmarks/serving_overhead.py`` puts on the median on/off pair ratio.

Truth from outside the code: the order statistics of the published sign-test tables for the
median (e.g. n = 10 -> x(2)..x(9), 97.9 %; n = 20 -> x(6)..x(15), 95.9 %), and the coverage a
simulation of a skewed, heavy-tailed spread (like one noisy pair here) actually gives.
"""

from __future__ import annotations


import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("serving_overhead.py", "serving_overhead_under_test")


@pytest.mark.parametrize("n, lo_rank, hi_rank", [(6, 1, 6), (8, 1, 8), (10, 2, 9), (12, 3, 10), (20, 6, 15),
                                                 (30, 10, 21)])
def test_ranks_are_the_published_sign_test_ranks(bench, n, lo_rank, hi_rank):
    values = [float(v) for v in np.random.default_rng(n).permutation(np.arange(1, n + 1))]
    assert bench.median_confidence_interval(values) == (float(lo_rank), float(hi_rank))


def test_too_few_pairs_give_no_interval(bench):
    assert bench.median_confidence_interval([0.9, 1.0, 1.1, 0.95, 1.05]) is None  # 93.8 % at best
    assert bench.median_confidence_interval([]) is None


def test_the_interval_covers_the_true_median_as_often_as_it_says(bench):
    rng = np.random.default_rng(7)
    true_median = 0.96
    hits = 0
    trials = 3000
    for _ in range(trials):
        # log-normal around the median with an occasional wild pair (a neighbour's burst)
        x = true_median * np.exp(rng.normal(0, 0.08, 16))
        x[rng.random(16) < 0.1] *= rng.choice([0.7, 1.4])
        lo, hi = bench.median_confidence_interval(list(x))
        hits += lo <= true_median <= hi
    assert 0.95 <= hits / trials <= 0.995  # exact coverage for n = 16 is 97.9 %


def test_verdict_needs_the_whole_interval(bench):
    v = bench.interval_verdict
    assert v((0.951, 1.02), 0.95, higher_is_better=True) == "PASS"
    assert v((0.90, 0.949), 0.95, higher_is_better=True) == "FAIL"
    assert v((0.93, 0.99), 0.95, higher_is_better=True) == "NOT RESOLVED"
    assert v((0.02, 0.09), 0.1, higher_is_better=False) == "PASS"
    assert v((0.11, 0.2), 0.1, higher_is_better=False) == "FAIL"
    assert v((0.05, 0.2), 0.1, higher_is_better=False) == "NOT RESOLVED"
    assert v(None, 0.95, higher_is_better=True).startswith("NOT RESOLVED")
