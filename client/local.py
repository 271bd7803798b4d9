"""What one client does with its private log: plain functions, no Flower.

A client holds one user's log (`fedrec.client.store.UserLog`) and the public catalog (content
features). In a round it
  1. loads the global shared weights into its local copy of the model,
  2. trains them for `local_epochs` passes over its own history, each pass one `LocalStep`:
     a plain step here, a DP-SGD step from client/privacy.py (same loop, same clip),
  3. answers with the change (trained - global), clipped to the update clip, and its number
     of training targets.
For evaluation it ranks the whole catalog for its held-out item and answers with that one
user's metric values (HR, NDCG, MRR @K): never the item, its history or its rank list.

Nothing else leaves: the optimizer is created fresh each round and dropped afterwards, so
the client keeps no per-user parameter that could leak or that the server would need.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from fedrec.client.store import UserLog
from fedrec.shared.evaluation.metrics import exclude_seen, hit_rate, mrr, ndcg, target_ranks
from fedrec.shared.model.recommender import RecommenderModel, load_weights, shared_weights
from fedrec.shared.model.training import left_pad, train_steps
from fedrec.shared.protocol import LocalConfig, TrainMetrics, Weights, clip_update, zero_update


def user_windows(history: np.ndarray, max_len: int) -> list[np.ndarray]:
    """The history cut from the newest end into windows of max_len + 1 items that overlap by
    one, so every event is a next-item target exactly once per pass."""
    windows, end = [], len(history)
    while end >= 2:
        windows.append(history[max(0, end - max_len - 1):end])
        end -= max_len
    return windows


class LocalStep:
    """One local epoch of training: the plain one. client/privacy.py's DP-SGD step overrides
    how the history is cut into examples, how the optimizer is wrapped, and the step itself."""

    def begin(self) -> None:
        """Before the data is touched (the DP step checks its privacy budget here)."""

    def examples(self, history: np.ndarray, max_len: int) -> list[np.ndarray]:
        return user_windows(history, max_len)

    @contextlib.contextmanager
    def optimizer(self, model: RecommenderModel, base: torch.optim.Optimizer,
                  examples: list[np.ndarray]) -> Iterator[torch.optim.Optimizer]:
        yield base

    def step(self, model: RecommenderModel, optimizer: torch.optim.Optimizer, examples: list[np.ndarray],
             rng: np.random.Generator) -> float:
        return train_steps(model, optimizer, examples, batch_size=len(examples), rng=rng)

    def finish(self, metrics: TrainMetrics, trained: bool) -> TrainMetrics:
        """After training (the DP step writes its ledger and reports its epsilon here)."""
        return metrics


def make_optimizer(model: RecommenderModel, cfg: LocalConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr)


def local_update(model: RecommenderModel, global_weights: Weights, log: UserLog, cfg: LocalConfig,
                 rng: np.random.Generator, step: LocalStep | None = None) -> tuple[Weights, TrainMetrics]:
    """Train the global weights on this user's history; returns (delta, metrics)."""
    step = step or LocalStep()
    step.begin()
    load_weights(model, global_weights)
    examples = step.examples(log.history(cfg.train_on), model.cfg.max_len)
    if not examples:  # one item: no next-item target; the server skips a zero-example reply
        return zero_update(global_weights), step.finish(TrainMetrics(0.0), trained=False)
    model.train()
    with step.optimizer(model, make_optimizer(model, cfg), examples) as optimizer:
        losses = [step.step(model, optimizer, examples, rng) for _ in range(cfg.local_epochs)]
    trained = shared_weights(model)
    delta = clip_update({name: trained[name] - global_weights[name] for name in trained}, cfg.clip)
    targets = float(sum(len(e) - 1 for e in examples))
    return delta, step.finish(TrainMetrics(targets, float(np.mean(losses))), trained=True)


@torch.no_grad()
def local_metrics(model: RecommenderModel, log: UserLog, stage: str, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """This user's HR/NDCG/MRR @K for the `stage` target, by full ranking with the history
    excluded: the same definition as `fedrec.shared.evaluation.ranking.evaluate`, for one user."""
    model.eval()
    history = log.history(stage)
    user = model.user_vector(left_pad([history], model.cfg.max_len))
    scores = exclude_seen(model.score_all(user).double().numpy(), [history])
    rank = target_ranks(scores, np.array([log.target(stage)]))
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(hit_rate(rank, k)[0])
        out[f"ndcg@{k}"] = float(ndcg(rank, k)[0])
        out[f"mrr@{k}"] = float(mrr(rank, k)[0])
    return out
