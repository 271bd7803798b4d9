"""The encoder's scores fused with an item-item model's (recency-weighted EASE or item-kNN): each
standardised per user, then summed with a weight chosen on validation.

Why: the encoder reads the order of a history and the items' content; an item-item model over
the co-occurrence of items reads which items go together, which on MovieLens is much of the
signal (tuned and recency-weighted, it beats the encoder alone: docs/results.md, "Quality"). Each
sees what the other misses, and standardising makes one weight enough. Both item models are
built from the co-occurrence matrix X^T X, a sum over users, so a federation computes it with
one secure sum.

Plain numpy: works on any scorer (histories -> (B, N + 1) scores, column 0 = padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from shared.evaluation.baselines import EASE, ItemKNN
from shared.evaluation.metrics import exclude_seen, ndcg, target_ranks
from shared.settings import default

Scorer = Callable[[list[np.ndarray]], np.ndarray]
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)   # the item-item weight's search grid (encoder: 1)
ITEM_ONLY = float("inf")                          # in the grid's report: the item-item scores alone


@dataclass(frozen=True)
class FusionConfig:
    """What a federation fuses: the item model's settings and weight are fixed here (a federation
    has no central validation set; the defaults are the centralized job's choices on ML-100K
    validation)."""
    kind: str = default("fusion")                 # "auto" (= "ease" here), "ease", "item-knn" or "none"
    weight: float = default("fusion-weight")
    decay: float = default("fusion-decay")
    l2: float = default("ease-l2")
    neighbours: int = default("knn-neighbours")
    shrink: float = default("knn-shrink")
    min_devices: int = default("counts-min-devices")   # the co-occurrence sum's floor (server and devices)

    @property
    def item_kind(self) -> str:
        """The item model: "auto" is EASE, the centralized job's choice on ML-100K validation."""
        return "ease" if self.kind == "auto" else self.kind

    @property
    def item_settings(self) -> dict:
        if self.item_kind == "ease":
            return {"l2": self.l2, "decay": self.decay}
        return {"neighbours": self.neighbours, "shrink": self.shrink, "decay": self.decay}

    def item_model(self, cooccurrence: np.ndarray):
        """The item model fit from the (N+1, N+1) co-occurrence X^T X."""
        make = {"ease": EASE, "item-knn": ItemKNN}[self.item_kind]
        return make(**self.item_settings).from_cooccurrence(cooccurrence)


def standardised(scores: np.ndarray) -> np.ndarray:
    """Each row's items (columns 1..N) to mean 0, sd 1; column 0 stays -inf. Non-finite item
    scores are an error here, as in the evaluator."""
    items = np.asarray(scores, dtype=np.float64)[:, 1:]
    if not np.isfinite(items).all():
        raise ValueError("a scorer gave NaN or infinite item scores; they cannot be fused")
    out = np.empty((items.shape[0], items.shape[1] + 1))
    out[:, 1:] = (items - items.mean(axis=1, keepdims=True)) / (items.std(axis=1, keepdims=True) + 1e-12)
    out[:, 0] = -np.inf
    return out


class FusedScorer:
    """encoder z-score + weight x item-item z-score, per user."""

    def __init__(self, encoder: Scorer, items: Scorer, weight: float):
        self.encoder, self.items, self.weight = encoder, items, weight

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        if self.weight == 0:
            return self.encoder(histories)
        return standardised(self.encoder(histories)) + self.weight * standardised(self.items(histories))


def choose_weight(encoder: Scorer, items: Scorer, histories: list[np.ndarray], targets: np.ndarray,
                  weights=WEIGHTS, batch_size: int = 256) -> tuple[float, dict[float, float]]:
    """The weight of `weights` with the best NDCG@10 on these (validation) histories and targets,
    and the NDCG@10 of every weight tried (and of the item-item scores alone, key ITEM_ONLY). Each
    scorer runs once per batch."""
    totals = dict.fromkeys([*weights, ITEM_ONLY], 0.0)
    for start in range(0, len(histories), batch_size):
        batch, batch_targets = histories[start:start + batch_size], targets[start:start + batch_size]
        enc, item = standardised(encoder(batch)), standardised(items(batch))
        for w in totals:
            scores = item.copy()
            if w != ITEM_ONLY:
                scores[:, 1:] = enc[:, 1:] + w * item[:, 1:]
            totals[w] += ndcg(target_ranks(exclude_seen(scores, batch), batch_targets), 10).sum()
    table = {w: total / max(len(histories), 1) for w, total in totals.items()}
    best = max(weights, key=lambda w: (table[w], -w))   # ties: the smaller weight
    return best, table
