"""Training the recommender on histories: plain functions, no Flower, no privacy.

`train_steps` is the unit a federated client will run on its own history; `fit` is the
centralized loop (all users' histories in one place) that gives the upper bound every
federated or private run is compared with.

Model selection uses the validation item (early stopping on validation NDCG@10); then the
validation item joins the training data for `refit_fraction` x the selected epoch count more
epochs (a data-dependent length: a model selected early overfits early), as it would in a
deployment where only the future is unknown. The test item is never trained on. Baselines
in the benchmark get the same data for the test stage (`with_validation_in_train`).

Objective: next-item prediction at every position of a user's training sequence, with a
softmax over the whole catalog (cross-entropy), which for sequential recommenders beats the
original SASRec's one-negative BCE by a wide margin (Klenitskiy & Vasilev, RecSys 2023).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fedrec.shared.evaluation.ranking import evaluate
from fedrec.shared.model.recommender import RecommenderModel
from fedrec.shared.data.preprocess import Split, with_validation_in_train
from fedrec.shared.settings import default


@dataclass
class TrainConfig:
    epochs: int = default("epochs")
    batch_size: int = default("batch-size")
    lr: float = default("lr")  # 3x faster to the same or better validation than 1e-3 (docs/results.md)
    weight_decay: float = default("weight-decay")
    eval_every: int = default("eval-every")  # epochs between validation runs
    patience: int = default("patience")  # validation runs without improvement before stopping
    seed: int = default("seed")
    time_budget_s: float | None = None  # stop early (keeping the best model) past this
    epoch_averaging: float = default("epoch-averaging")  # >0: select (and refit) the exponential average of the
                                  # weights over epochs with this decay, not the last weights
    refit_fraction: float = default("refit-fraction")  # after selection: this x best epoch more epochs on train +
                                 # validation items (never test); 0 turns the refit off

    @classmethod
    def from_settings(cls, v: dict) -> "TrainConfig":
        return cls(epochs=v["epochs"], batch_size=v["batch-size"], lr=v["lr"], weight_decay=v["weight-decay"],
                   eval_every=v["eval-every"], patience=v["patience"], seed=v["seed"], time_budget_s=v["time-budget"],
                   epoch_averaging=v["epoch-averaging"], refit_fraction=v["refit-fraction"])

    def to_dict(self) -> dict:
        return asdict(self)


def left_pad(histories: list[np.ndarray], length: int) -> torch.Tensor:
    """Keep each history's newest `length` items, pad on the left with 0 -> (B, length)."""
    out = np.zeros((len(histories), length), dtype=np.int64)
    for row, h in enumerate(histories):
        h = h[-length:]
        if len(h):
            out[row, -len(h):] = h
    return torch.from_numpy(out)


def sequence_batches(sequences: list[np.ndarray], max_len: int, batch_size: int,
                     rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (inputs, targets) pairs: inputs = seq[:-1], targets = seq[1:], both (B, L).

    A history longer than max_len + 1 contributes a window ending at a random position (the
    newest window half of the time), so over epochs every event is trained on while each step
    stays at length max_len."""
    usable = [s for s in sequences if len(s) >= 2]
    order = rng.permutation(len(usable))
    for start in range(0, len(order), batch_size):
        chunk = [_window(usable[i], max_len + 1, rng) for i in order[start:start + batch_size]]
        yield left_pad([s[:-1] for s in chunk], max_len), left_pad([s[1:] for s in chunk], max_len)


def _window(seq: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    if len(seq) <= length or rng.random() < 0.5:
        return seq[-length:]
    end = int(rng.integers(length, len(seq) + 1))
    return seq[end - length:end]


def next_item_loss(model: RecommenderModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next item over the full catalog, at non-padded positions."""
    table = model.item_tower.all_items()                # (N+1, D), once per batch
    states = model.user_states(inputs, table)           # (B, L, D)
    real = targets != 0
    logits = model.score_all(states[real], table)       # (P, N+1), P real positions
    return F.cross_entropy(logits, targets[real])


def per_example_loss(model: RecommenderModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's mean next-item cross-entropy over its non-padded positions.

    The same objective as `next_item_loss`, shaped for per-example gradients (DP-SGD): the item
    tower is called on the inputs and on the states, so Opacus sees both uses of the catalog
    table (fedrec.shared.privacy.dp_grad). Scores every position, padding included: pad inputs only to the
    longest sequence in the batch."""
    states = model.user_states(inputs)                   # (B, L, D)
    scores = model.item_tower(states)                    # (B, L, N+1)
    losses = F.cross_entropy(scores.transpose(1, 2), targets, ignore_index=0, reduction="none")
    return losses.sum(1) / (targets != 0).sum(1).clamp(min=1)


def train_steps(model: RecommenderModel, optimizer: torch.optim.Optimizer, sequences: list[np.ndarray],
                *, batch_size: int, rng: np.random.Generator, max_steps: int | None = None) -> float:
    """One pass over `sequences` (or `max_steps` batches); returns the mean loss."""
    model.train()
    losses = []
    for step, (inputs, targets) in enumerate(sequence_batches(sequences, model.cfg.max_len, batch_size, rng)):
        if max_steps is not None and step >= max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = next_item_loss(model, inputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def model_scorer(model: RecommenderModel, batch_size: int = 256) -> Callable[[list[np.ndarray]], np.ndarray]:
    """Adapter: the model as an `evaluation.Scorer`."""
    @torch.no_grad()
    def score(histories: list[np.ndarray]) -> np.ndarray:
        model.eval()
        items = model.item_tower.all_items()
        out = []
        for start in range(0, len(histories), batch_size):
            users = model.user_vector(left_pad(histories[start:start + batch_size], model.cfg.max_len))
            out.append((users @ items.T).numpy())
        return np.concatenate(out)
    return score


@dataclass
class FitResult:
    best_state: dict             # the model as returned: the selected weights, refit when refit_epochs > 0
    best_epoch: int
    curve: list[dict] = field(default_factory=list)  # {"epoch", "loss", "ndcg@10", "hr@10"}
    stopped_because: str = "epochs"
    refit_epochs: int = 0
    train_seconds: float = 0.0
    selected_state: dict | None = None   # the selected weights before the refit: they never saw a validation item


def fit(model: RecommenderModel, split: Split, cfg: TrainConfig,
        progress: Callable[[dict], None] | None = None) -> FitResult:
    """Centralized training with early stopping on validation NDCG@10; restores the best model."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sequences = [u.train for u in split.users]
    best, best_epoch, since_best = -1.0, 0, 0
    best_state = copy.deepcopy(model.state_dict())
    result = FitResult(best_state, 0)
    # Validation NDCG moves by ~0.01 between checks on 943 users; an average of the weights
    # over recent epochs is steadier to select than the last weights (Polyak averaging).
    averaged = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.epoch_averaging))
                if cfg.epoch_averaging > 0 else None)
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        loss = train_steps(model, optimizer, sequences, batch_size=cfg.batch_size, rng=rng)
        if averaged is not None:
            averaged.update_parameters(model)
        selected = averaged.module if averaged is not None else model
        point = {"epoch": epoch, "loss": loss}
        last = epoch == cfg.epochs
        out_of_time = cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s
        if epoch % cfg.eval_every == 0 or last or out_of_time:
            metrics = evaluate(model_scorer(selected), split, "valid").metrics
            point.update({"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"]})
            if metrics["ndcg@10"] > best:
                best, best_epoch, since_best = metrics["ndcg@10"], epoch, 0
                best_state = copy.deepcopy(selected.state_dict())
            else:
                since_best += 1
        result.curve.append(point)
        if progress:
            progress(point)
        if out_of_time:
            result.stopped_because = "time budget"
            break
        if since_best >= cfg.patience:
            result.stopped_because = "early stopping"
            break
    model.load_state_dict(best_state)
    result.selected_state = best_state
    refit_epochs = round(cfg.refit_fraction * best_epoch)
    if refit_epochs:
        # The validation item chose the epoch; now it joins the training data, as it would in
        # deployment. The test item is never trained on.
        refit = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        everything_but_test = with_validation_in_train(split).users
        for _ in range(refit_epochs):
            train_steps(model, refit, [u.train for u in everything_but_test],
                        batch_size=cfg.batch_size, rng=rng)
        best_state = copy.deepcopy(model.state_dict())
    result.best_state, result.best_epoch, result.refit_epochs = best_state, best_epoch, refit_epochs
    result.train_seconds = time.perf_counter() - start
    return result
