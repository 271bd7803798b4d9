"""Reference recommenders, fit on the same training split and scored by the same evaluator.

  MostPopular   items by training-interaction count
  ItemKNN       cosine item-item similarity over the user-item matrix, top-k neighbours kept
                (Sarwar et al., WWW 2001; Deshpande & Karypis, TOIS 2004)
  EASE          closed-form linear item-item autoencoder (Steck, WWW 2019)

Each is fit with `fit(split)` and then called like `evaluation.Scorer`: histories -> scores.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shared.data.preprocess import Split, item_popularity


def interaction_matrix(split: Split) -> sp.csr_matrix:
    """Users x (N+1) binary matrix of training interactions (column 0 = padding, empty)."""
    rows = np.repeat(np.arange(len(split)), [len(u.train) for u in split.users])
    cols = np.concatenate([u.train for u in split.users])
    return sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                         shape=(len(split), split.n_items + 1))


def history_matrix(histories: list[np.ndarray], n_columns: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.array([], dtype=np.int64)
    return sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), n_columns))


class MostPopular:
    name = "most-popular"

    def fit(self, split: Split) -> "MostPopular":
        self.counts = item_popularity(split).astype(np.float64)
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))


class ItemKNN:
    name = "item-knn"

    def __init__(self, neighbours: int = 100, shrink: float = 10.0):
        self.neighbours, self.shrink = neighbours, shrink

    def fit(self, split: Split) -> "ItemKNN":
        X = interaction_matrix(split)
        co = (X.T @ X).toarray()                               # (N+1, N+1) co-occurrence
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.neighbours < sim.shape[0]:                     # keep each item's top-k neighbours
            cut = np.argpartition(-sim, self.neighbours, axis=1)[:, self.neighbours:]
            np.put_along_axis(sim, cut, 0.0, axis=1)
        self.similarity = sim
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.asarray(history_matrix(histories, self.similarity.shape[0]) @ self.similarity)


class EASE:
    name = "ease"

    def __init__(self, l2: float = 250.0):
        self.l2 = l2

    def fit(self, split: Split) -> "EASE":
        X = interaction_matrix(split)
        gram = (X.T @ X).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.l2
        P = np.linalg.inv(gram)
        B = P / (-np.diag(P))
        B[np.diag_indices_from(B)] = 0.0
        self.weights = B
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.asarray(history_matrix(histories, self.weights.shape[0]) @ self.weights)
