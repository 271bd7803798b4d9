"""Reference recommenders, fit on the same training split and scored by the same evaluator.

  MostPopular   items by training-interaction count
  ItemKNN       cosine item-item similarity over the user-item matrix, top-k neighbours kept
                (Sarwar et al., WWW 2001; Deshpande & Karypis, TOIS 2004)
  EASE          closed-form linear item-item autoencoder (Steck, WWW 2019)
  SessionKNN    the users whose logs are most like the user's recent items vote for their items
                (SKNN / V-SKNN: Jannach & Ludewig, RecSys 2017; Ludewig & Jannach, UMUAI 2018)

ItemKNN and EASE are order-aware with `decay` < 1: the history item of age a (0 = newest) weighs
decay^a when scoring, so recent items count most; decay 1 is the classic unordered model.
SessionKNN with `recent` = N uses the last N items, weighted linearly by position (V-SKNN) when
`linear` is set. Each is fit with `fit(split)` and then called like `evaluation.Scorer`:
histories -> scores. `simulation/baselines.py` tunes them on validation.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from fedrec.shared.data.preprocess import Split, item_popularity


def interaction_matrix(split: Split) -> sp.csr_matrix:
    """Users x (N+1) binary matrix of training interactions (column 0 = padding, empty)."""
    rows = np.repeat(np.arange(len(split)), [len(u.train) for u in split.users])
    cols = np.concatenate([u.train for u in split.users])
    return sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                         shape=(len(split), split.n_items + 1))


def history_matrix(histories: list[np.ndarray], n_columns: int, decay: float = 1.0) -> sp.csr_matrix:
    """One row per history; the item of age a (0 = the newest) weighs decay^a (a repeated item: the sum)."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.array([], dtype=np.int64)
    ages = np.concatenate([np.arange(len(h))[::-1] for h in histories]) if histories else np.array([])
    return sp.csr_matrix((np.power(decay, ages).astype(np.float32), (rows, cols)), shape=(len(histories), n_columns))


class MostPopular:
    name = "most-popular"

    def fit(self, split: Split) -> "MostPopular":
        self.counts = item_popularity(split).astype(np.float64)
        return self

    def from_cooccurrence(self, co: np.ndarray) -> "MostPopular":
        """From the (N+1, N+1) co-occurrence X^T X: its diagonal counts each item's users."""
        self.counts = np.diag(co).astype(np.float64).copy()
        self.counts[0] = 0.0
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))


class ItemKNN:
    name = "item-knn"

    def __init__(self, neighbours: int = 100, shrink: float = 10.0, decay: float = 1.0):
        self.neighbours, self.shrink, self.decay = neighbours, shrink, decay

    def fit(self, split: Split) -> "ItemKNN":
        X = interaction_matrix(split)
        return self.from_cooccurrence((X.T @ X).toarray())

    def from_cooccurrence(self, co: np.ndarray) -> "ItemKNN":
        """Fit from the (N+1, N+1) co-occurrence X^T X (a federation sums it securely)."""
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.neighbours < sim.shape[0]:                     # keep each item's top-k neighbours
            cut = np.argpartition(-sim, self.neighbours, axis=1)[:, self.neighbours:]
            np.put_along_axis(sim, cut, 0.0, axis=1)
        self.similarity = sim
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.asarray(history_matrix(histories, self.similarity.shape[0], self.decay) @ self.similarity)


class EASE:
    name = "ease"

    def __init__(self, l2: float = 250.0, decay: float = 1.0):
        self.l2, self.decay = l2, decay

    def fit(self, split: Split) -> "EASE":
        X = interaction_matrix(split)
        return self.from_cooccurrence((X.T @ X).toarray())

    def from_cooccurrence(self, co: np.ndarray) -> "EASE":
        """Fit from the (N+1, N+1) co-occurrence X^T X (a federation sums it securely)."""
        gram = np.array(co, dtype=np.float64)
        gram[np.diag_indices_from(gram)] += self.l2
        P = spd_inverse(gram)
        B = P / (-np.diag(P))
        B[np.diag_indices_from(B)] = 0.0
        self.weights = B
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.asarray(history_matrix(histories, self.weights.shape[0], self.decay) @ self.weights)


def spd_inverse(gram: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix (a Gram matrix plus a ridge) by a float32
    Cholesky factorisation: 0.12 s at ML-100K's 1,683 items against 0.37 s for np.linalg.inv in
    float64 (one core), relative error 5e-7. Each device of the blend round fits EASE once. A matrix
    that is not positive definite (counts no honest sum gives) takes the general float64 inverse."""
    import torch
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(gram.astype(np.float32)))
    if int(info) == 0 and torch.isfinite(factor).all():
        inverse = torch.cholesky_inverse(factor).numpy().astype(np.float64)
        # float32 is enough for a well-conditioned matrix (a ridge of hundreds); a tiny ridge or a
        # crafted matrix may not be: one probe vector, O(n^2), decides.
        probe = np.random.default_rng(0).standard_normal(len(gram))
        if np.isfinite(inverse).all() and np.linalg.norm(gram @ (inverse @ probe) - probe) <= 1e-3 * np.linalg.norm(probe):
            return inverse
    return np.linalg.inv(gram)


class SessionKNN:
    """The `recent` newest history items are the query; the `neighbours` training logs most similar
    to it (cosine over items) score each item by the summed similarity of the logs that hold it.
    The user's own training log is among the candidates (the scorer does not know whose history it
    is); its items are all in the history, which the evaluator excludes, so it adds nothing: one
    more neighbour is kept to make up for the slot it takes."""
    name = "session-knn"

    def __init__(self, neighbours: int = 100, recent: int = 10, linear: bool = True):
        self.neighbours, self.recent, self.linear = neighbours, recent, linear

    def fit(self, split: Split) -> "SessionKNN":
        X = interaction_matrix(split)
        X.data[:] = 1.0
        norms = np.sqrt(np.asarray(X.sum(axis=1)).ravel())
        self.logs = X.tocsc()
        self.normalised = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ X
        return self

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        n_columns = self.logs.shape[1]
        rows, cols, vals = [], [], []
        for row, history in enumerate(histories):
            recent = np.asarray(history[-self.recent:], dtype=np.int64)
            # V-SKNN: position p of n (1 = oldest) weighs p / n; SKNN: all 1.
            weight = np.arange(1, len(recent) + 1) / max(len(recent), 1) if self.linear else np.ones(len(recent))
            rows += [row] * len(recent)
            cols += list(recent)
            vals += list(weight)
        query = sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), n_columns))
        similarity = np.asarray((query @ self.normalised.T).todense())       # (batch, users)
        kept = self.neighbours + 1
        if kept < similarity.shape[1]:
            cut = np.argpartition(-similarity, kept, axis=1)[:, kept:]
            np.put_along_axis(similarity, cut, 0.0, axis=1)
        return (sp.csr_matrix(similarity) @ self.logs).toarray()
