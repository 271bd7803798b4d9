"""What one client does with its private log: plain functions, no Flower.

A client holds one user's log (`UserLog`: training items, validation item, test item, as
catalog indices) and the public catalog (content features). In a round it
  1. loads the global shared weights into its local copy of the model,
  2. trains them for `local_epochs` passes over its own history,
  3. answers with the change (trained - global) and its number of training targets.
For evaluation it ranks the whole catalog for its held-out item and answers with that one
user's metric values (HR, NDCG, MRR @K): never the item, its history or its rank list.

Nothing else leaves: the optimizer is created fresh each round and dropped afterwards, so
the client keeps no per-user parameter that could leak or that the server would need.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shared.metrics import exclude_seen, hit_rate, mrr, ndcg, target_ranks
from shared.model import Recommender
from shared.training import left_pad, train_steps
from shared.wire import Layout, Weights



@dataclass(frozen=True)
class UserLog:
    """One user's private behaviour log in catalog indices, oldest first."""
    train: np.ndarray  # (T,) items trained on
    valid: int         # second-last item: validation target
    test: int          # last item: test target (trained on by nobody)

    def history(self, stage: str) -> np.ndarray:
        """The items the user had touched before the `stage` target."""
        if stage == "valid":
            return self.train
        if stage == "test":
            return np.append(self.train, self.valid)
        raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")

    def target(self, stage: str) -> int:
        return self.valid if stage == "valid" else self.test

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, train=self.train, valid=self.valid, test=self.test)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "UserLog":
        with np.load(path) as f:
            return cls(f["train"].astype(np.int64), int(f["valid"]), int(f["test"]))


@dataclass
class LocalConfig:
    """Local training on one client, per round."""
    local_epochs: int = 2       # passes over the user's own history
    lr: float = 1e-3
    optimizer: str = "adam"     # "adam" or "sgd"; fresh every round (no state kept)
    train_on: str = "valid"     # "valid": train items only; "test": train + validation item
    clip: float = 0.0           # >0: scale the whole delta down to this L2 norm at most (bounds
                                # one user's influence; needed by secure aggregation and DP)

    def to_dict(self) -> dict:
        return asdict(self)


def shared_weights(model: Recommender) -> Weights:
    """The weights every client trains and the server aggregates: all trainable parameters.
    Buffers (content features, ID hashing) are public catalog data and never travel."""
    return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()}


def model_layout(model: Recommender) -> Layout:
    """Names and shapes of the shared weights, in wire order (shared.wire)."""
    return {name: tuple(p.shape) for name, p in sorted(model.named_parameters())}


def load_weights(model: Recommender, weights: Weights) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(torch.from_numpy(np.asarray(value)))


def user_windows(history: np.ndarray, max_len: int) -> list[np.ndarray]:
    """The history cut from the newest end into windows of max_len + 1 items that overlap by
    one, so every event is a next-item target exactly once per pass."""
    windows, end = [], len(history)
    while end >= 2:
        windows.append(history[max(0, end - max_len - 1):end])
        end -= max_len
    return windows


def local_update(model: Recommender, global_weights: Weights, log: UserLog, cfg: LocalConfig,
                 rng: np.random.Generator) -> tuple[Weights, dict[str, float]]:
    """Train the global weights on this user's history; returns (delta, metrics)."""
    load_weights(model, global_weights)
    history = log.history(cfg.train_on)
    windows = user_windows(history, model.cfg.max_len)
    if not windows:  # one item: no next-item target; the server skips a zero-example reply
        return zero_update(global_weights), {"num-examples": 0.0, "train-loss": float("nan")}
    optimizer = (torch.optim.Adam(model.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
                 else torch.optim.SGD(model.parameters(), lr=cfg.lr))
    losses = [train_steps(model, optimizer, windows, batch_size=len(windows), rng=rng)
              for _ in range(cfg.local_epochs)]
    trained = shared_weights(model)
    delta = clip_delta({name: trained[name] - global_weights[name] for name in trained}, cfg.clip)
    return delta, {"num-examples": float(len(history) - 1), "train-loss": float(np.mean(losses))}


def zero_update(weights: Weights) -> Weights:
    """The reply of a client that did not train: no change to any weight."""
    return {name: np.zeros_like(v) for name, v in weights.items()}


def clip_delta(delta: Weights, clip: float) -> Weights:
    """Scale the whole update down to L2 norm `clip` at most (0: no clipping)."""
    if clip <= 0:
        return delta
    norm = float(np.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values())))
    if norm <= clip:
        return delta
    return {name: d * np.float32(clip / norm) for name, d in delta.items()}


@torch.no_grad()
def local_metrics(model: Recommender, log: UserLog, stage: str, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """This user's HR/NDCG/MRR @K for the `stage` target, by full ranking with the history
    excluded: the same definition as `shared.evaluation.evaluate`, for one user."""
    model.eval()
    history = log.history(stage)
    user = model.user_vector(left_pad([history], model.cfg.max_len))
    scores = exclude_seen(model.score_all(user).double().numpy(), [history])
    rank = target_ranks(scores, np.array([log.target(stage)]))
    out = {"users": 1.0}
    for k in ks:
        out[f"hr@{k}"] = float(hit_rate(rank, k)[0])
        out[f"ndcg@{k}"] = float(ndcg(rank, k)[0])
        out[f"mrr@{k}"] = float(mrr(rank, k)[0])
    return out
