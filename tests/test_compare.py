"""Paired comparison of two runs with a bootstrap interval (metarec.compare)."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.compare import format_comparison, ndcg_at_10, paired_bootstrap


def test_ndcg_at_10_per_user():
    np.testing.assert_allclose(ndcg_at_10([1, 3, 10, 11, 500]), [1.0, 0.5, 1 / np.log2(11), 0.0, 0.0])


def test_bootstrap_interval_brackets_the_difference_and_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    base = rng.random(300)
    other = base + 0.05 + rng.normal(0, 0.2, 300)
    diff, lower, upper = paired_bootstrap(base, other, seed=1)
    assert diff == pytest.approx((other - base).mean())
    assert lower < diff < upper
    assert lower > 0  # a clear gain: the interval excludes 0
    assert paired_bootstrap(base, other, seed=1) == (diff, lower, upper)  # seeded
    big_base = rng.random(3000)
    big_other = big_base + 0.05 + rng.normal(0, 0.2, 3000)
    _, big_lower, big_upper = paired_bootstrap(big_base, big_other, seed=1)
    assert big_upper - big_lower < (upper - lower) / 2  # ~ 1/sqrt(10)


def test_no_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(2)
    base = rng.random(500)
    other = base + rng.normal(0, 0.1, 500) - 0.0  # noise only
    diff, lower, upper = paired_bootstrap(base, other - (other - base).mean())
    assert abs(diff) < 1e-12 and lower < 0 < upper


def test_format_says_whether_the_interval_includes_zero():
    c = {"metric": "NDCG@10", "difference": 0.0012, "relative": 0.033, "ci95": [-0.001, 0.0035], "n_users": 300}
    line = format_comparison(c, "MetaRec vs target-only")
    assert line == ("MetaRec vs target-only NDCG@10: +0.0012 (+3.3%), 95% interval [-0.0010, +0.0035] "
                    "(includes 0: within noise; paired bootstrap over 300 test users)")
    c["ci95"] = [0.0002, 0.0035]
    assert "(excludes 0;" in format_comparison(c, "x")


def test_unpaired_arrays_are_rejected():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
