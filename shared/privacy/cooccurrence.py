"""A user-level DP item-item model from one noisy sum: each user's normalised item co-occurrence,
summed over users with Gaussian noise, then EASE (Steck, WWW 2019) on the noisy matrix, and
recency-weighted scoring of the user's own history (which never leaves the device), blended with
a private popularity count read from the same release (its row sums: post-processing, no extra
privacy cost) with a weight that grows with the noise.

Why a sum: the co-occurrence matrix is a sum over users, so a federation can release it with one
secure sum and distributed noise (each client adds a share), and one release means one Gaussian
mechanism per user, with no composition over rounds. That is what DP training of the encoder
cannot offer on a few hundred users (docs/results.md, "Differential privacy").

The mechanism, for a user with k distinct training items: x = 1/sqrt(k) on those items, and the
user contributes the strict upper triangle of x x^T (item pairs i < j, each 1/k). Its L2 norm is
sqrt((1 - 1/k) / 2) <= 1/sqrt(2), whoever the user is: the sensitivity for adding or removing one
user, which also bounds adding, removing or changing one interaction. One record of up to W
interactions can move it further (the rest is renormalised): `record_sensitivity(W)`, 0.906 for
W = 51. The noise is calibrated to the unit asked for (`unit_sensitivity`). The diagonal is not
released; EASE's ridge term takes its place.
Plain numpy; no Flower, no torch. `simulation/dp_bench.py: run_dp_items_bench` measures it.

Without DP the federation sums exact counts instead (`counts_contribution`, stage COUNTS_STAGE):
each device's item pairs and items (1 each), summed by secure aggregation, give the item
co-occurrence matrix X^T X that EASE and item-kNN need (shared/model/fusion.py fuses them with the
encoder). The server learns that sum over every device and nothing about one device beyond it;
with no noise, the sum is not differentially private (a pair held by one user shows that some user
holds it).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from fedrec.shared.model.fusion import standardised

SENSITIVITY = 1 / math.sqrt(2)   # L2 norm bound of one user's contribution
DECAY = 0.9                      # the device weighs an item decay^age (newest 1): chosen on ML-100K validation
STAGE = "item-item"              # the round config's stage for the release's secure sum
POPULARITY_WEIGHT = 0.15         # popularity's weight is this times the noise variance: chosen on ML-100K
                                 # validation at epsilon 1, 2, 4 and 8, three noise seeds each


@functools.lru_cache(maxsize=16)
def record_sensitivity(window: int, max_items: int = 2000) -> float:
    """The most one record (up to `window` interactions) can move a user's contribution: removing r
    distinct items from a log of k leaves pairs of k - r items at 1/(k - r) instead of 1/k. The
    maximum over k and r <= window (0.906 for records of 51; above the user bound, 1/sqrt(2),
    because what is left is renormalised)."""
    best = SENSITIVITY ** 2
    for k in range(2, max_items):
        for r in range(1, min(window, k) + 1):
            a = k - r
            if a > 1:
                best = max(best, a * (a - 1) / 2 * (r / (a * k)) ** 2 + (k * (k - 1) - a * (a - 1)) / (2 * k * k))
    return math.sqrt(best)


def unit_sensitivity(mode: str, window: int) -> float:
    """What the noise is calibrated to: adding or removing one user (1/sqrt(2); this also bounds
    adding, removing or changing one interaction), or one record of up to `window` interactions
    (`record_sensitivity`); "both": the larger."""
    if mode == "user":
        return SENSITIVITY
    if mode in ("record", "both"):
        return max(SENSITIVITY, record_sensitivity(window))
    raise ValueError(f"no DP unit for privacy mode {mode!r}")


def ridge_for(noise_std: float) -> float:
    """EASE's ridge for a release with this noise std per pair: 30 without noise, growing with the
    noise (chosen on ML-100K validation at epsilon 4 and 8, three noise seeds each)."""
    return 30.0 + 1000.0 * noise_std


COUNTS_STAGE = "item-counts"     # the round config's stage for the exact co-occurrence sum (no DP)
MAX_COUNTED_ITEMS = 300          # a device counts its newest 300 distinct items: bounds its vector's norm
                                 # (COUNTS_CLIP), which sizes the secure sum's fixed point


def counts_size(n_items: int) -> int:
    """Coordinates of the counts sum: every item pair, then every item."""
    return pair_count(n_items) + n_items


COUNTS_CLIP = math.sqrt(MAX_COUNTED_ITEMS * (MAX_COUNTED_ITEMS - 1) / 2 + MAX_COUNTED_ITEMS)


def counts_contribution(items: np.ndarray, n_items: int) -> np.ndarray:
    """One device's exact counts: 1 at each pair of its newest MAX_COUNTED_ITEMS distinct items and 1
    at each of those items (L2 norm <= COUNTS_CLIP)."""
    items = np.asarray(items, dtype=np.int64)
    items = items[(items >= 1) & (items <= n_items)]
    newest_first = items[::-1]
    _, first = np.unique(newest_first, return_index=True)
    kept = np.sort(newest_first[np.sort(first)][:MAX_COUNTED_ITEMS])
    out = np.zeros(counts_size(n_items))
    i, j = np.triu_indices(len(kept), k=1)
    out[pair_index(kept[i], kept[j], n_items)] = 1.0
    out[pair_count(n_items) + kept - 1] = 1.0
    return out


def cooccurrence_from_counts(total: np.ndarray, n_items: int) -> np.ndarray:
    """The (n_items + 1)^2 co-occurrence matrix X^T X (row/column 0 = padding) from the decoded sum
    of `counts_contribution`s, rounded to whole counts (the fixed point's rounding is < 0.5)."""
    total = np.rint(np.asarray(total, dtype=np.float64))
    G = symmetric(total[:pair_count(n_items)], n_items)
    G[np.arange(1, n_items + 1), np.arange(1, n_items + 1)] = total[pair_count(n_items):]
    return G


def without_own_validation(total: np.ndarray, train: np.ndarray, valid: int, n_items: int) -> np.ndarray:
    """The co-occurrence matrix from a counts sum this device gave its training and validation items
    to, with its validation item taken back out: exactly the sum with this device's training items
    in its place (the newest-300 cut included), so a model fit from it never counted the item. Other
    devices' validation items stay in, as in the centralized refit."""
    train = np.asarray(train, dtype=np.int64)
    mine = counts_contribution(np.append(train, valid), n_items) - counts_contribution(train, n_items)
    return cooccurrence_from_counts(np.asarray(total, dtype=np.float64) - mine, n_items)


def popularity_weight(noise_std: float) -> float:
    """How much the private popularity count weighs against the (standardised) item-item score: none
    without noise; at high noise the co-occurrence is mostly noise and popularity, summed over a
    whole row, is what is left. Chosen on ML-100K validation (three noise draws per epsilon; at
    epsilon 4, validation NDCG@10 0.054 with it against 0.051 without)."""
    return POPULARITY_WEIGHT * noise_std ** 2


def popularity(G: np.ndarray) -> np.ndarray:
    """A private popularity score per item from the released co-occurrence (row 0 = padding, 0): each
    row sums what the users holding that item contribute with it, so rows follow how many users hold
    the item. Standardised over items."""
    rows = G[1:].sum(axis=1)
    out = np.zeros(G.shape[0])
    out[1:] = (rows - rows.mean()) / (rows.std() + 1e-12)
    return out


def pair_count(n_items: int) -> int:
    return n_items * (n_items - 1) // 2


def pair_index(i: np.ndarray, j: np.ndarray, n_items: int) -> np.ndarray:
    """Flat position of item pairs (i < j, items 1..n_items) in the strict upper triangle."""
    a, b = i - 1, j - 1
    return a * (2 * n_items - a - 1) // 2 + (b - a - 1)


def _user_pairs(items: np.ndarray, n_items: int) -> tuple[np.ndarray, float]:
    """The positions of a user's item pairs and the value 1/k each gets (k distinct items)."""
    distinct = np.unique(np.asarray(items, dtype=np.int64))
    distinct = distinct[(distinct >= 1) & (distinct <= n_items)]
    i, j = np.triu_indices(len(distinct), k=1)
    return pair_index(distinct[i], distinct[j], n_items), 1.0 / max(len(distinct), 1)


def user_contribution(items: np.ndarray, n_items: int) -> np.ndarray:
    """One user's vector: 1/k at each pair of its k distinct items (norm <= SENSITIVITY)."""
    out = np.zeros(pair_count(n_items))
    positions, value = _user_pairs(items, n_items)
    out[positions] = value
    return out


def release(user_items: list[np.ndarray], n_items: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """The sum of the users' contributions plus Gaussian noise of `noise_std` per pair: what the
    secure sum with distributed noise would decode (here computed in one process)."""
    total = np.zeros(pair_count(n_items))
    for items in user_items:
        positions, value = _user_pairs(items, n_items)
        total[positions] += value
    return total + rng.normal(0.0, noise_std, total.shape)


def symmetric(upper: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items + 1)^2 co-occurrence matrix (row/column 0 = padding) from the released triangle."""
    G = np.zeros((n_items + 1, n_items + 1))
    i, j = np.triu_indices(n_items, k=1)
    G[i + 1, j + 1] = upper
    return G + G.T


def ease_weights(G: np.ndarray, l2: float) -> np.ndarray:
    """EASE's item-item weights from a (noisy) co-occurrence matrix: B = -P / diag(P), P = (G + l2 I)^-1."""
    G = G.copy()
    G[np.diag_indices_from(G)] += l2
    P = np.linalg.inv(G)
    B = P / (-np.diag(P))
    B[np.diag_indices_from(B)] = 0.0
    return B


class ItemItemScorer:
    """Scores every item for a history as sum_t decay^(age of t) B[item_t] (the newest item weighs 1),
    standardised per user, plus `popularity_weight` times the private popularity score. Runs on the
    device with the user's own history."""

    def __init__(self, weights: np.ndarray, decay: float, popularity: np.ndarray | None = None,
                 popularity_weight: float = 0.0):
        self.weights, self.decay = weights, decay
        self.popularity = np.zeros(weights.shape[1]) if popularity is None else np.asarray(popularity, np.float64)
        self.popularity_weight = popularity_weight

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(histories), self.weights.shape[1]))
        for row, history in enumerate(histories):
            h = np.asarray(history, dtype=np.int64)
            out[row] = (self.decay ** np.arange(len(h))[::-1]) @ self.weights[h]
        return standardised(out) + self.popularity_weight * self.popularity   # column 0 (padding) stays -inf
