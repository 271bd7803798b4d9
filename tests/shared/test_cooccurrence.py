"""The user-level DP item-item model: the sensitivity its noise is calibrated to, and the exact
(noise-free) statistic it releases."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.shared.privacy.cooccurrence import (DECAY, SENSITIVITY, ItemItemScorer, ease_weights, pair_count, pair_index,
                                         popularity, popularity_weight, release, symmetric, user_contribution)


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


def test_popularity_from_the_release_ranks_items_by_how_many_users_hold_them():
    logs = [np.array([1, 2]), np.array([1, 3]), np.array([1, 4]), np.array([2, 3])]
    G = symmetric(release(logs, 4, 0.0, np.random.default_rng(0)), 4)
    pop = popularity(G)
    assert pop[0] == 0 and pop[1] > pop[2] == pop[3] > pop[4]


def test_popularity_weighs_nothing_without_noise_and_more_as_noise_grows():
    assert popularity_weight(0.0) == 0.0
    assert 0 < popularity_weight(0.5) < popularity_weight(1.0) < popularity_weight(3.0)


def test_at_high_noise_the_blend_recommends_what_most_users_hold():
    # Items 1..3 are held by everyone; the item-item weights are pure noise: the blend's top 3 is the popular items.
    rng = np.random.default_rng(0)
    logs = [np.array([1, 2, 3, 4 + u % 20]) for u in range(200)]
    noise = 5.0
    G = symmetric(release(logs, 24, noise, rng), 24)
    scores = ItemItemScorer(rng.normal(size=(25, 25)), DECAY, popularity(G), popularity_weight(noise))(
        [np.array([10])])[0]
    assert set(np.argsort(-scores)[:3]) == {1, 2, 3}


def test_counts_are_the_users_newest_items_and_their_pairs_within_the_clip():
    from fedrec.shared.privacy.cooccurrence import (COUNTS_CLIP, MAX_COUNTED_ITEMS, cooccurrence_from_counts,
                                             counts_contribution)
    v = counts_contribution(np.array([2, 4, 2, 3]), 4)
    G = cooccurrence_from_counts(v, 4)
    assert np.array_equal(np.diag(G)[1:], [0, 1, 1, 1]) and G[2, 4] == G[3, 4] == G[2, 3] == 1 and G[1].sum() == 0
    many = counts_contribution(np.arange(1, 1001), 1000)
    assert np.linalg.norm(many) == pytest.approx(COUNTS_CLIP)
    kept = np.flatnonzero(many[pair_count(1000):]) + 1          # the newest MAX_COUNTED_ITEMS items
    assert list(kept) == list(range(1001 - MAX_COUNTED_ITEMS, 1001))
