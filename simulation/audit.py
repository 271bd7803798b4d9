"""Empirical privacy audit: canary records and a loss-based membership-inference attack.

A canary is one record the model could memorise and nothing else predicts: two random items
alternating (a, b, a, b, ...) for a whole record window. That is a strong pattern inside
exactly one record, the unit record-level DP protects. Half the canaries (the members) go
into the logs of distinct users as their oldest record; the others are never trained on.
After training, the attacker scores each canary by the model's next-item loss on it and
calls the low-loss ones members. The attack's AUC is set against the largest AUC that any
test can reach against an (epsilon, delta)-DP mechanism. That bound is the area under the
curve TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (Kairouz et al., 2015).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from shared.model.recommender import Recommender
from shared.model.training import left_pad, per_example_loss


@dataclass(frozen=True)
class Canaries:
    sequences: np.ndarray    # (2m, window) item indices
    member: np.ndarray       # (2m,) bool: inserted into a user's log
    users: np.ndarray        # (2m,) the user who holds a member canary (-1 for non-members)


def make_canaries(n_items: int, n_users: int, count: int, window: int, seed: int = 0) -> Canaries:
    """`count` member and `count` non-member canaries, each (a, b, a, b, ...) of `window`
    items with a != b drawn at random; members go to `count` distinct random users."""
    rng = np.random.default_rng([seed, 7])
    pairs = np.stack([rng.choice(np.arange(1, n_items + 1), size=2, replace=False) for _ in range(2 * count)])
    sequences = pairs[:, np.arange(window) % 2]
    member = np.zeros(2 * count, dtype=bool)
    member[rng.choice(2 * count, size=count, replace=False)] = True
    users = np.full(2 * count, -1)
    users[member] = rng.choice(n_users, size=count, replace=False)
    return Canaries(sequences, member, users)


def insert_canaries(split, canaries: Canaries):
    """The split with each member canary prepended to its user's training items (their oldest
    record; with the record window as its length it is exactly one record)."""
    users = list(split.users)
    for seq, user in zip(canaries.sequences[canaries.member], canaries.users[canaries.member]):
        u = users[user]
        times = np.full(len(seq), u.train_times[0] if len(u.train_times) else 0, dtype=u.train_times.dtype)
        users[user] = replace(u, train=np.concatenate([seq, u.train]),
                              train_times=np.concatenate([times, u.train_times]))
    return replace(split, users=users)


@torch.no_grad()
def canary_losses(model: Recommender, canaries: Canaries) -> np.ndarray:
    """The model's mean next-item loss on each canary, read as a sequence of its own."""
    model.eval()
    seqs = canaries.sequences
    inputs = left_pad([s[:-1] for s in seqs], seqs.shape[1] - 1)
    targets = left_pad([s[1:] for s in seqs], seqs.shape[1] - 1)
    return per_example_loss(model, inputs, targets).double().numpy()


def attack_auc(losses: np.ndarray, member: np.ndarray) -> float:
    """AUC of "lower loss means member": the probability that a random member canary has a
    lower loss than a random non-member one (ties count half)."""
    m, n = losses[member], losses[~member]
    wins = (m[:, None] < n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()
    return float(wins / (len(m) * len(n)))


def auc_bound(epsilon: float, delta: float) -> float:
    """The largest membership-inference AUC an (epsilon, delta)-DP mechanism allows."""
    if math.isinf(epsilon):
        return 1.0
    fpr = np.linspace(0.0, 1.0, 100_001)
    tpr = np.minimum.reduce([np.ones_like(fpr), math.exp(epsilon) * fpr + delta,
                             1 - math.exp(-epsilon) * (1 - delta - fpr)])
    return float(np.trapezoid(np.clip(tpr, 0, 1), fpr))
