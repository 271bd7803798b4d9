"""Metrics on a hand-computed case, and against independent implementations."""
import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from fedrec.shared.evaluation.metrics import (coverage, exclude_seen, expected_rank, hit_rate, mrr, ndcg, novelty,
                                       target_ranks, top_k)


def test_hand_computed_case():
    # 2 users, items 1..5 (column 0 pads). User 0 saw item 1; user 1 saw items 2 and 3.
    scores = np.array([[0, 9.0, 1.0, 5.0, 3.0, 2.0],
                       [0, 4.0, 8.0, 7.0, 1.0, 6.0]])
    scores = exclude_seen(scores, [np.array([1]), np.array([2, 3])])
    ranks = target_ranks(scores, np.array([4, 5]))
    # user 0 ranking after exclusion: 3 (5.0), 4 (3.0), 5, 2 -> target 4 at rank 2
    # user 1: 5 (6.0), 1 (4.0), 4 -> target 5 at rank 1
    assert ranks.tolist() == [[2, 2], [1, 1]]
    assert list(hit_rate(ranks, 1)) == [0.0, 1.0]
    assert ndcg(ranks, 10) == pytest.approx([1 / np.log2(3), 1.0])
    assert mrr(ranks, 10) == pytest.approx([0.5, 1.0])
    assert list(top_k(scores, 2)[0]) == [3, 4] and list(top_k(scores, 2)[1]) == [5, 1]
    assert coverage(top_k(scores, 2), n_items=5) == pytest.approx(4 / 5)
    # novelty: item_users counts, 10 users
    item_users = np.array([0, 9, 1, 4, 0, 2])
    assert novelty(np.array([[3, 4]]), item_users, 10) == pytest.approx(
        np.mean([-np.log2(5 / 11), -np.log2(1 / 11)]))


def test_a_tied_target_gets_the_same_span_whatever_its_index():
    """Before session 9 ties went to the lower index: item 1 ranked 1st and item 3 3rd on equal
    scores, so an index order that follows popularity flattered tie-heavy scorers."""
    scores = np.array([[-np.inf, 1.0, 1.0, 1.0, 0.5]])
    assert target_ranks(np.repeat(scores, 3, axis=0), np.array([1, 2, 3])).tolist() == [[1, 3]] * 3
    assert target_ranks(scores, np.array([4])).tolist() == [[4, 4]]
    assert expected_rank(target_ranks(scores, np.array([2]))).tolist() == [2.0]
    assert list(top_k(scores, 2)[0]) == [1, 2]


def test_metrics_are_their_expected_value_over_shuffled_tie_orders():
    """A tie across position K counts a fraction of a hit (the session-9 review: a mean rank of
    10.5 at K = 10 would count none)."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, 30)).astype(float)
    targets = rng.integers(1, 30, size=40)
    spans = target_ranks(scores, targets)
    totals = {"hr": 0.0, "ndcg": 0.0, "mrr": 0.0}
    draws = 3000
    for _ in range(draws):
        order = rng.permutation(30)       # a random tie order: rank by score, then by this order
        ranks = np.array([1 + (row > row[t]).sum() + ((row == row[t]) & (order < order[t])).sum()
                          for row, t in zip(scores, targets)], dtype=float)
        totals["hr"] += hit_rate(ranks, 5).mean() / draws
        totals["ndcg"] += ndcg(ranks, 5).mean() / draws
        totals["mrr"] += mrr(ranks, 5).mean() / draws
    assert hit_rate(spans, 5).mean() == pytest.approx(totals["hr"], abs=0.01)
    assert ndcg(spans, 5).mean() == pytest.approx(totals["ndcg"], abs=0.01)
    assert mrr(spans, 5).mean() == pytest.approx(totals["mrr"], abs=0.01)
    assert hit_rate(np.array([[10.0, 11.0]]), 10).tolist() == [0.5]


def reference_rank(row: np.ndarray, target: int) -> int:
    """Independent: a stable descending sort, then the target's position."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    return order.index(target) + 1


@pytest.mark.parametrize("seed", range(5))
def test_against_brute_force_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 60
    scores = rng.normal(size=(n_users, n_items + 1))
    histories = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 10), replace=False) for _ in range(n_users)]
    targets = np.array([rng.choice(np.setdiff1d(np.arange(1, n_items + 1), h)) for h in histories])
    masked = exclude_seen(scores.copy(), histories)
    ranks = target_ranks(masked, targets)
    assert list(expected_rank(ranks)) == [reference_rank(masked[u], t) for u, t in enumerate(targets)]
    for k in (1, 5, 10):
        top = top_k(masked, k)
        for u in range(n_users):
            assert list(top[u]) == sorted(range(n_items + 1), key=lambda i: (-masked[u, i], i))[:k]
        # sklearn's NDCG@k with one relevant item (finite scores only, no ties here)
        ours = ndcg(ranks, k)
        for u, t in enumerate(targets):
            finite = np.isfinite(masked[u])
            truth = (np.arange(n_items + 1) == t)[finite][None, :].astype(float)
            assert ours[u] == pytest.approx(ndcg_score(truth, masked[u][finite][None, :], k=k))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_infinite_score_is_an_error_not_a_first_place(bad):
    """At 4b8af3e target_ranks([[-inf, 1, nan, .5]], [2]) returned rank 1: a diverged model
    reported HR = NDCG = 1."""
    scores = np.array([[-np.inf, 1.0, bad, 0.5]])
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        target_ranks(scores, np.array([2]))
    assert target_ranks(np.array([[-np.inf, 1.0, 0.7, 0.5]]), np.array([2])).tolist() == [[2, 2]]


def test_coverage_counts_only_items_actually_recommended():
    """A user who has seen all but two of five items gets two recommendations, not ten: the
    excluded items (and padding) filling the other slots are no coverage (it read 1.033 on a
    30-item synthetic catalog before)."""
    import numpy as np

    from fedrec.shared.data.preprocess import Split, UserSplit
    from fedrec.shared.evaluation.ranking import evaluate
    users = [UserSplit("u", np.array([1, 2, 3]), 4, 5, np.arange(3))]
    split = Split(users, 5)
    result = evaluate(lambda histories: np.ones((len(histories), 6)), split, "valid")
    assert result.metrics["coverage@10"] == 2 / 5


def test_tie_free_users_are_those_whose_last_event_is_strictly_the_latest():
    from fedrec.shared.evaluation.ranking import subset_metrics, tie_free_users
    mask = tie_free_users([np.array([1, 2, 3]), np.array([1, 5, 5]), np.array([4, 4, 9])])
    assert list(mask) == [True, False, True]
    out = subset_metrics(np.array([[1.0, 1.0], [1.0, 1.0], [20.0, 20.0]]), mask)
    assert out["users"] == 2 and out["hr@10"] == 0.5 and out["ndcg@10"] == pytest.approx(0.5)
