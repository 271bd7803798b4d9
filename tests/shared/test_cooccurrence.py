"""The user-level DP item-item model: the sensitivity its noise is calibrated to, and the exact
(noise-free) statistic it releases."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.privacy.cooccurrence import (SENSITIVITY, ItemItemScorer, ease_weights, pair_count, pair_index, release,
                                         symmetric, user_contribution)


def test_pairs_are_laid_out_as_the_strict_upper_triangle():
    n = 7
    i, j = np.triu_indices(n, k=1)
    assert np.array_equal(pair_index(i + 1, j + 1, n), np.arange(pair_count(n)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=80))
def test_one_user_moves_the_release_by_at_most_the_sensitivity(items):
    """Adding or removing any one user changes the released sum by that user's contribution, whose
    L2 norm is sqrt((1 - 1/k) / 2) <= 1/sqrt(2) for k distinct items: the noise's calibration."""
    contribution = user_contribution(np.array(items, dtype=np.int64), 40)
    k = len(set(items))
    assert np.linalg.norm(contribution) <= SENSITIVITY + 1e-12
    if k >= 2:
        assert np.linalg.norm(contribution) == pytest.approx(np.sqrt((1 - 1 / k) / 2))
    others = [np.array([1, 2, 3]), np.array([2, 5])]
    with_user = release(others + [np.array(items, dtype=np.int64)], 40, 0.0, np.random.default_rng(0))
    without = release(others, 40, 0.0, np.random.default_rng(0))
    assert np.allclose(with_user - without, contribution)


def test_the_noise_free_release_is_the_normalised_co_occurrence():
    users = [np.array([1, 2, 2, 3]), np.array([2, 4]), np.array([5])]
    G = symmetric(release(users, 5, 0.0, np.random.default_rng(0)), 5)
    dense = np.zeros((6, 6))
    for items in users:
        x = np.zeros(6)
        x[np.unique(items)] = 1 / np.sqrt(len(np.unique(items)))
        dense += np.outer(x, x)
    np.fill_diagonal(dense, 0.0)
    assert np.allclose(G, dense)


def test_scoring_weighs_the_newest_item_most():
    B = ease_weights(symmetric(release([np.array([1, 2]), np.array([3, 4]), np.array([1, 2])], 4, 0.0,
                                       np.random.default_rng(0)), 4), 2.0)
    scores = ItemItemScorer(B, 0.5)([np.array([3, 1])])[0]     # 1 is the newest
    assert scores[2] > scores[4]
