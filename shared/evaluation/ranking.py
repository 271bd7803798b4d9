"""Full-ranking leave-one-out evaluation of anything that scores the catalog for a history.

A scorer is a function: list of histories (item-index arrays) -> (B, N+1) scores. The model,
most-popular and the kNN baselines all go through the same `evaluate`, so their numbers are
comparable by construction.

Validation: history = train, target = second-last item.
Test:       history = train + second-last item, target = last item.
The history's items are excluded from the ranking ("seen items excluded").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedrec.shared.evaluation.metrics import (NEG_INF, coverage, exclude_seen, hit_rate, mrr, ndcg, novelty, target_ranks,
                            top_k)
from fedrec.shared.data.preprocess import Split, item_popularity

Scorer = Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    ranks: np.ndarray  # (users, 2) rank spans, in split order (metrics.target_ranks)


def histories_and_targets(split: Split, stage: str) -> tuple[list[np.ndarray], np.ndarray]:
    if stage == "valid":
        return [u.train for u in split.users], np.array([u.valid for u in split.users])
    if stage == "test":
        return [u.history_for_test for u in split.users], np.array([u.test for u in split.users])
    raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")


def evaluate(scorer: Scorer, split: Split, stage: str = "test", *, ks: tuple[int, ...] = (10,),
             batch_size: int = 256, sampled_negatives: int = 0, seed: int = 0) -> Evaluation:
    """Full-ranking metrics @K for every user; with `sampled_negatives` > 0 also the sampled
    protocol (the held-out item against that many random unseen items), keyed `sampled_*`."""
    histories, targets = histories_and_targets(split, stage)
    n_items = split.n_items
    item_users = item_popularity(split)
    rng = np.random.default_rng(seed)
    ranks, sampled_ranks, recommended = [], [], {k: [] for k in ks}
    for start in range(0, len(histories), batch_size):
        batch_h, batch_t = histories[start:start + batch_size], targets[start:start + batch_size]
        scores = exclude_seen(np.asarray(scorer(batch_h), dtype=np.float64).copy(), batch_h)
        ranks.append(target_ranks(scores, batch_t))
        for k in ks:
            best = top_k(scores, k)
            best[np.take_along_axis(scores, best, axis=1) == NEG_INF] = 0   # excluded items fill no slot
            recommended[k].append(best)
        if sampled_negatives:
            sampled_ranks.append(_sampled_ranks(scores, batch_t, sampled_negatives, rng))
    ranks = np.concatenate(ranks)
    metrics: dict[str, float] = {}
    for k in ks:
        top = np.concatenate(recommended[k])
        metrics[f"hr@{k}"] = float(hit_rate(ranks, k).mean())
        metrics[f"ndcg@{k}"] = float(ndcg(ranks, k).mean())
        metrics[f"mrr@{k}"] = float(mrr(ranks, k).mean())
        metrics[f"coverage@{k}"] = coverage(top, n_items)
        metrics[f"novelty@{k}"] = novelty(top, item_users, len(split))
    if sampled_negatives:
        s_ranks = np.concatenate(sampled_ranks)
        for k in ks:
            metrics[f"sampled{sampled_negatives}_hr@{k}"] = float(hit_rate(s_ranks, k).mean())
            metrics[f"sampled{sampled_negatives}_ndcg@{k}"] = float(ndcg(s_ranks, k).mean())
    return Evaluation(metrics, ranks)


def tie_free_users(timestamps: list[np.ndarray]) -> np.ndarray:
    """Per user (split order): True when the test event's timestamp is later than every other.
    Where the last two share a timestamp (44% of ML-100K's users), which of them is the test item
    is an accident of file order; metrics on the tie-free users alone show whether that matters."""
    return np.array([len(t) >= 2 and t[-1] > t[-2] for t in timestamps])


def subset_metrics(ranks: np.ndarray, mask: np.ndarray, k: int = 10) -> dict:
    """HR@k and NDCG@k over the users in `mask`, and how many they are."""
    chosen = ranks[mask]
    return {"users": int(mask.sum()), f"hr@{k}": float(hit_rate(chosen, k).mean()) if chosen.size else float("nan"),
            f"ndcg@{k}": float(ndcg(chosen, k).mean()) if chosen.size else float("nan")}


def _sampled_ranks(scores: np.ndarray, targets: np.ndarray, n_negatives: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Rank of the target among itself and `n_negatives` uniformly drawn unseen items."""
    ranks = np.empty((len(targets), 2))
    for row, target in enumerate(targets):
        pool = np.flatnonzero(np.isfinite(scores[row]))
        pool = pool[pool != target]
        negatives = rng.choice(pool, size=min(n_negatives, len(pool)), replace=False)
        candidates = np.append(negatives, target)
        ranks[row] = target_ranks(scores[row:row + 1, candidates], np.array([len(candidates) - 1]))[0]
    return ranks
