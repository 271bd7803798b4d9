"""Empirical privacy audit: canary records, a loss-based membership-inference attack, and the
empirical epsilon lower bound of one-run auditing (Steinke, Nasr & Jagielski, NeurIPS 2023).

A canary is one record the model could memorise and nothing else predicts: two random items
alternating (a, b, a, b, ...) for a whole record window. That is a strong pattern inside
exactly one record, the unit record-level DP protects. Half the canaries (the members) go
into the logs of distinct users as their oldest record; the others are never trained on.
After training, the attacker scores each canary by the model's next-item loss on it and
calls the low-loss ones members. The attack's AUC is set against the largest AUC that any
test can reach against an (epsilon, delta)-DP mechanism. That bound is the area under the
curve TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (Kairouz et al., 2015).

One-run auditing turns the same attack into a lower bound on epsilon: each of m canaries is
put in the training data independently with probability 1/2 (`make_canaries(..., independent=True)`),
the auditor guesses "in" for the k lowest-loss canaries and "out" for the k highest, and counts
its correct guesses. Against an (epsilon, delta)-DP training run the count is stochastically
dominated by Binomial(guesses, e^eps / (1 + e^eps)) plus a delta term (their Theorem 5.2);
`epsilon_lower_bound` is the largest epsilon that the observed count rejects at confidence
1 - p. It is a lower bound on the true epsilon of the run, for this attack only: a value far
under the claimed epsilon says the attack is weak, a value above it says the claim is wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedrec.shared.model.recommender import RecommenderModel
from fedrec.shared.model.training import left_pad, per_example_loss


@dataclass(frozen=True)
class Canaries:
    sequences: np.ndarray    # (2m, window) item indices
    member: np.ndarray       # (2m,) bool: inserted into a user's log
    users: np.ndarray        # (2m,) the user who holds a member canary (-1 for non-members)


def make_canaries(n_items: int, n_users: int, count: int, window: int, seed: int = 0, *,
                  independent: bool = False) -> Canaries:
    """2 x `count` canaries, each (a, b, a, b, ...) of `window` items with a != b drawn at random.
    By default exactly half are members; `independent`: each is a member with probability 1/2,
    independently (what one-run auditing needs). Members go to distinct random users when there
    are enough users, else round-robin (a user then holds several canary records)."""
    rng = np.random.default_rng([seed, 7])
    pairs = np.stack([rng.choice(np.arange(1, n_items + 1), size=2, replace=False) for _ in range(2 * count)])
    sequences = pairs[:, np.arange(window) % 2]
    member = np.zeros(2 * count, dtype=bool)
    if independent:
        member = rng.random(2 * count) < 0.5
    else:
        member[rng.choice(2 * count, size=count, replace=False)] = True
    users = np.full(2 * count, -1)
    holders = rng.permutation(n_users)
    users[member] = holders[np.arange(member.sum()) % n_users]
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
def canary_losses(model: RecommenderModel, canaries: Canaries) -> np.ndarray:
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


def _p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[at least `correct` of `guesses` right] for an (epsilon, delta)-DP run with m canaries
    (Steinke, Nasr & Jagielski 2023, Theorem 5.2)."""
    from scipy.stats import binom
    q = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))
    alpha, mass = 0.0, 0.0
    for i in range(1, correct + 1):
        mass += float(binom.pmf(correct - i, guesses, q))
        alpha = max(alpha, mass / i)
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(losses: np.ndarray, member: np.ndarray, delta: float, *, p: float = 0.05,
                        guesses: int | None = None) -> dict:
    """One-run audit: guess "in" for the guesses/2 lowest-loss canaries and "out" for the guesses/2
    highest (default: a tenth of the canaries each way), and the largest epsilon the count of
    right guesses rejects at confidence 1 - p (0 when it rejects none)."""
    m = len(losses)
    k = max(1, (guesses or max(2, m // 5)) // 2)
    order = np.argsort(losses, kind="stable")
    correct = int(member[order[:k]].sum() + (~member[order[-k:]]).sum())
    lo, hi = 0.0, 1.0
    if _p_value(m, 2 * k, correct, 0.0, delta) >= p:
        return {"epsilon_lower_bound": 0.0, "guesses": 2 * k, "correct": correct, "canaries": m, "confidence": 1 - p}
    while _p_value(m, 2 * k, correct, hi, delta) < p and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _p_value(m, 2 * k, correct, mid, delta) < p else (lo, mid)
    return {"epsilon_lower_bound": lo, "guesses": 2 * k, "correct": correct, "canaries": m, "confidence": 1 - p}
