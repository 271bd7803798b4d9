"""Ranking metrics for leave-one-out evaluation: one held-out item per user.

Ranks are 1-based over the full catalog after removing the user's own training items (and
the padding index 0). A target tied with t other items may sit anywhere from `above + 1` to
`above + 1 + t`: `target_ranks` gives that span, and each metric is its mean over the span, the
expected value under a random order of the tie (a tie across position K counts a fraction of a
hit). Breaking ties by item index instead would favour low indices, which on ML-100K follow
popularity (Spearman -0.81), and so flatter a scorer with many ties such as most-popular.
Top-K lists (coverage, novelty) need one order: there ties go to the lower index.

With a single relevant item at rank r (a span: the mean over its ranks):
  HR@K   = 1[r <= K]
  NDCG@K = 1[r <= K] / log2(r + 1)      (the ideal DCG is 1)
  MRR@K  = 1[r <= K] / r
Catalog coverage@K = |union of all users' top-K lists| / N
Novelty@K          = mean over recommended items of -log2(p_i), p_i = (users who trained on
                     item i + 1) / (users + 1): higher means less popular recommendations.
"""
from __future__ import annotations

import numpy as np

NEG_INF = -np.inf


def exclude_seen(scores: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """Set the padding column and each user's history items to -inf, in place."""
    scores[:, 0] = NEG_INF
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    if len(rows):
        scores[rows, np.concatenate(histories)] = NEG_INF
    return scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(B, N) scores, (B,) target indices -> (B, 2) spans of 1-based ranks: the first and last
    position the target can take among the items tied with it (equal without a tie). -inf marks an excluded item; NaN or +inf is an error (a diverged model), never a rank: a NaN
    compares false with everything and would rank first, giving HR = NDCG = 1."""
    bad = np.isnan(scores) | (scores == np.inf)
    if bad.any():
        row, item = np.argwhere(bad)[0]
        raise ValueError(f"{int(bad.sum())} score(s) are NaN or +inf (first: row {row}, item {item}): "
                         "the model diverged; its ranks would be meaningless")
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    above = (scores > target_scores).sum(axis=1)
    tied_others = (scores == target_scores).sum(axis=1) - 1
    return np.stack([1 + above, 1 + above + tied_others], axis=1).astype(np.float64)


def expected_rank(ranks: np.ndarray) -> np.ndarray:
    """The mean rank of each span (a 1-D array of ranks is returned as it is)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return ranks if ranks.ndim == 1 else ranks.mean(axis=1)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) -> (B, k) item indices, best first, ties to the lower index."""
    part = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, : k + 1]
    # Re-rank the candidates exactly: by score descending, then index ascending.
    cand_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -cand_scores), axis=1)
    best = np.take_along_axis(part, order, axis=1)[:, :k]
    # argpartition may cut inside a tie at position k: fall back to a full sort for those rows.
    kth_score = np.take_along_axis(scores, best[:, -1:], axis=1)
    unsafe = (scores == kth_score).sum(axis=1) > (np.take_along_axis(scores, best, axis=1) == kth_score).sum(axis=1)
    for row in np.flatnonzero(unsafe):
        best[row] = np.lexsort((np.arange(scores.shape[1]), -scores[row]))[:k]
    return best


def _expected(ranks: np.ndarray, k: int, gain) -> np.ndarray:
    """Per user, gain(rank) if rank <= k else 0: for (B,) ranks at that rank, for (B, 2) spans the
    mean over the span's ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim == 1:
        return np.where(ranks <= k, gain(np.maximum(ranks, 1.0)), 0.0)
    first, last = ranks[:, 0], ranks[:, 1]
    table = np.concatenate([[0.0], np.cumsum(gain(np.arange(1.0, k + 1)))])   # table[j]: gains of ranks 1..j
    inside = table[np.clip(last, 0, k).astype(np.int64)] - table[np.clip(first - 1, 0, k).astype(np.int64)]
    return inside / (last - first + 1)


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    return _expected(ranks, k, np.ones_like)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    return _expected(ranks, k, lambda r: 1.0 / np.log2(r + 1.0))


def mrr(ranks: np.ndarray, k: int) -> np.ndarray:
    return _expected(ranks, k, lambda r: 1.0 / r)


def coverage(recommended: np.ndarray, n_items: int) -> float:
    """Share of the catalog (indices 1..n_items) in at least one top-K list. Index 0 marks a slot
    with nothing in it (a user who has seen almost the whole catalog): not counted."""
    items = np.unique(recommended)
    return len(items[items > 0]) / n_items


def novelty(recommended: np.ndarray, item_users: np.ndarray, n_users: int) -> float:
    """Mean self-information of recommended items; item_users[i] = users who trained on i."""
    recommended = recommended[recommended > 0]   # empty slots (index 0) say nothing about novelty
    if not recommended.size:
        return float("nan")
    p = (item_users[recommended] + 1.0) / (n_users + 1.0)
    return float(np.mean(-np.log2(p)))
