"""The encoder's scores fused with an item model's (recency-weighted EASE or item-kNN, or popularity):
each standardised per user, then summed with a weight chosen on validation, or either alone.

Why: the encoder reads the order of a history and the items' content; an item-item model over
the co-occurrence of items reads which items go together, which on MovieLens is much of the
signal (tuned and recency-weighted, it beats the encoder alone: docs/results.md, "Quality"). Each
sees what the other misses, and standardising makes one weight enough. Both item models are
built from the co-occurrence matrix X^T X, a sum over users, so a federation computes it with
one secure sum.

The blend is chosen on validation among the encoder alone, each item model alone, and the encoder
plus item models at several weights (`choose_from_statistics`, rule `BLEND_RULE`): the best blend
that keeps the encoder, unless an item model alone is ahead of it by more than one paired standard
error, which is the safeguard a sparse log needs (there the item models can beat the encoder:
docs/results.md). On test that is a bet, not a guarantee.

Plain numpy: works on any scorer (histories -> (B, N + 1) scores, column 0 = padding).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedrec.shared.evaluation.baselines import EASE, ItemKNN, MostPopular
from fedrec.shared.evaluation.metrics import exclude_seen, ndcg, target_ranks
from fedrec.shared.settings import default

Scorer = Callable[[list[np.ndarray]], np.ndarray]
WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)   # the item model's weights tried (the encoder's is 1)
ITEM_ONLY = float("inf")                     # a blend's weight: the item model's scores alone
BLEND_KINDS = ("ease", "item-knn", "popular")   # the item models a blend may use ("auto")
MAKERS = {"ease": EASE, "item-knn": ItemKNN, "popular": MostPopular}
BLEND_STAGE = "blend"           # the round config's stage for the federated blend round's secure sum


@dataclass(frozen=True)
class Blend:
    """One candidate: the encoder's standardised scores (or none) plus each item model's at its weight.
    No parts: the encoder alone; no encoder: one item model alone."""
    parts: tuple[tuple[str, float], ...] = ()   # (item model, weight against the encoder's 1)
    encoder: bool = True

    @classmethod
    def of(cls, kind: str, weight: float) -> "Blend":
        """One item model at `weight` (0: the encoder alone; ITEM_ONLY: the item model alone)."""
        if weight == 0:
            return ENCODER_ALONE
        return cls(((kind, 1.0),), encoder=False) if weight == ITEM_ONLY else cls(((kind, weight),))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.parts)

    @property
    def weight(self) -> float:
        """A one-model blend's weight (ITEM_ONLY: that model alone; 0: the encoder alone)."""
        if not self.parts:
            return 0.0
        return self.parts[0][1] if self.encoder else ITEM_ONLY

    @property
    def item_weight(self) -> float:
        """The item models' total weight against the encoder's 1 (0 for the encoder alone)."""
        return sum(w for _, w in self.parts) if self.encoder else ITEM_ONLY

    @property
    def complexity(self) -> int:
        """What the one-SE rule prefers (fewer parts to trust): an item model alone 0, the encoder
        alone 1, the encoder with one item model 2, with two 3."""
        return 0 if not self.encoder else 1 + len(self.parts)

    @property
    def label(self) -> str:
        if not self.parts:
            return "encoder alone"
        if not self.encoder:
            return f"{self.parts[0][0]} alone"
        return " + ".join(["encoder", *(f"{w:g} x {kind}" for kind, w in self.parts)])

    def to_dict(self) -> dict:
        return {"parts": [list(p) for p in self.parts], "encoder": self.encoder}

    @classmethod
    def from_dict(cls, d: dict) -> "Blend":
        return cls(tuple((str(k), float(w)) for k, w in d["parts"]), bool(d["encoder"]))


ENCODER_ALONE = Blend()
PAIRED = ("ease", "item-knn")          # the item models also tried together with the encoder
PAIR_WEIGHTS = (0.5, 1.0, 2.0, 4.0)


def blends(kinds, weights=WEIGHTS) -> list[Blend]:
    """The candidates in a fixed order (a device's validation statistics follow it): the encoder alone;
    for each item model its weights ascending, then the item model alone; then, when both EASE and
    item-kNN are there, the encoder with the two at each pair of PAIR_WEIGHTS (two item models often
    err differently: on ML-100K cut to 8 events a user the three together are steadier than any two).
    Ties go to the earlier, so the encoder alone wins a tie, and a smaller weight a larger."""
    out = [ENCODER_ALONE] + [Blend.of(kind, w) for kind in kinds for w in (*sorted(weights), ITEM_ONLY)]
    if all(kind in kinds for kind in PAIRED):
        out += [Blend(tuple(zip(PAIRED, pair))) for pair in itertools.product(PAIR_WEIGHTS, repeat=2)]
    return out


@dataclass(frozen=True)
class FusionConfig:
    """What a federation fuses: the item models it may use, their settings (fixed: the centralized
    job's choices on ML-100K validation), and the blend when the validation round cannot run."""
    kind: str = default("fusion")                 # "auto" (any of BLEND_KINDS), one of them, or "none"
    weight: float = default("fusion-weight")      # without a validation round: this weight, EASE for "auto"
    decay: float = default("fusion-decay")
    l2: float = default("ease-l2")
    neighbours: int = default("knn-neighbours")
    shrink: float = default("knn-shrink")
    min_devices: int = default("counts-min-devices")   # the co-occurrence sum's floor (server and devices)
    blend_devices: int = default("blend-devices")      # devices the validation round asks (0: no round)

    @classmethod
    def from_run_config(cls, c: dict) -> "FusionConfig":
        """From checked run-config keys (shared/settings.py): the server's and each device's view."""
        return cls(kind=c["fusion"], weight=c["fusion-weight"], decay=c["fusion-decay"], l2=c["ease-l2"],
                   neighbours=c["knn-neighbours"], shrink=c["knn-shrink"], min_devices=c["counts-min-devices"],
                   blend_devices=c["blend-devices"])

    @property
    def kinds(self) -> tuple[str, ...]:
        return BLEND_KINDS if self.kind == "auto" else (self.kind,)

    @property
    def fallback(self) -> Blend:
        """The blend used when no validation statistics chose one: EASE for "auto"."""
        return Blend.of("ease" if self.kind == "auto" else self.kind, self.weight)

    def wire_settings(self) -> dict:
        """Every item model's settings, as the blend round sends them (shared/protocol.py)."""
        return {"l2": self.l2, "decay": self.decay, "neighbours": self.neighbours, "shrink": self.shrink}

    def settings(self, kind: str) -> dict:
        if kind == "ease":
            return {"l2": self.l2, "decay": self.decay}
        if kind == "item-knn":
            return {"neighbours": self.neighbours, "shrink": self.shrink, "decay": self.decay}
        return {}

    def item_model(self, kind: str, cooccurrence: np.ndarray):
        """The item model `kind` fit from the (N+1, N+1) co-occurrence X^T X."""
        return MAKERS[kind](**self.settings(kind)).from_cooccurrence(cooccurrence)


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
    """The encoder's z-score + each item model's z-score at its weight, per user (`blend`)."""

    def __init__(self, encoder: Scorer, items: dict[str, Scorer], blend: Blend):
        self.encoder, self.items, self.blend = encoder, items, blend

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        if not self.blend.parts:
            return self.encoder(histories)
        if not self.blend.encoder:
            return self.items[self.blend.parts[0][0]](histories)
        return blended(self.blend, standardised(self.encoder(histories)),
                       {kind: standardised(self.items[kind](histories)) for kind in self.blend.kinds})


def blended(blend: Blend, encoder: np.ndarray, items: dict[str, np.ndarray]) -> np.ndarray:
    """`blend` of standardised scores (a new array; column 0 stays -inf)."""
    out = encoder.copy() if blend.encoder else np.zeros_like(encoder)
    for kind, w in blend.parts:
        out += w * items[kind]
    out[:, 0] = -np.inf
    return out


def blend_ndcg(encoder: Scorer, items: dict[str, Scorer], candidates: list[Blend], histories: list[np.ndarray],
               targets: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(users, candidates): each (validation) target's NDCG@10 under each candidate. Each scorer runs
    once per batch."""
    out = np.zeros((len(histories), len(candidates)))
    for start in range(0, len(histories), batch_size):
        batch, batch_targets = histories[start:start + batch_size], targets[start:start + batch_size]
        enc = standardised(encoder(batch))
        scored = {kind: standardised(items[kind](batch)) for kind in {k for c in candidates for k in c.kinds}}
        for i, c in enumerate(candidates):
            ranks = target_ranks(exclude_seen(blended(c, enc, scored), batch), batch_targets)
            out[start:start + len(batch), i] = ndcg(ranks, 10)
    return out


def statistics_size(candidates: int) -> int:
    """Coordinates of `blend_statistics`: the sums, then the products' upper triangle."""
    return candidates + candidates * (candidates + 1) // 2


def statistics_clip(candidates: int) -> float:
    """The L2 bound of one user's statistics (every NDCG@10, and so every product, in [0, 1])."""
    return float(np.sqrt(statistics_size(candidates)))


def blend_statistics(per_user: np.ndarray) -> np.ndarray:
    """What choosing a blend needs from (users, K) NDCG@10 values, as sums over the users (so a
    secure sum of devices' statistics is the statistics of them all): each candidate's sum, and the
    sum of every product of two candidates' values (for paired variances)."""
    per_user = np.asarray(per_user, dtype=np.float64)
    upper = np.triu_indices(per_user.shape[1])
    return np.concatenate([per_user.sum(axis=0), (per_user.T @ per_user)[upper]])


def paired_moments(statistics: np.ndarray, users: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From summed `blend_statistics` of K candidates: each one's mean NDCG@10, and the (K, K) paired
    standard errors of the difference of two candidates' means."""
    if users <= 0:
        raise ValueError("blend statistics of no users: nothing to choose from")
    statistics = np.asarray(statistics, dtype=np.float64)
    means = statistics[:k] / users
    products = np.zeros((k, k))
    products[np.triu_indices(k)] = statistics[k:]
    products = (products + np.triu(products, 1).T) / users
    second = np.diag(products)
    # Var(x_i - x_j) over users: E[x_i^2] + E[x_j^2] - 2 E[x_i x_j] - (m_i - m_j)^2.
    paired = second[:, None] + second[None, :] - 2 * products - (means[:, None] - means[None, :]) ** 2
    return means, np.sqrt(np.maximum(paired, 0.0) / max(users - 1, 1))


def _within_one_se_of_best(means: np.ndarray, se: np.ndarray) -> list[int]:
    best = int(np.argmax(means))
    return [i for i in range(len(means)) if means[i] >= means[best] - se[i, best]]


def _simplest(candidates: list[Blend], means: np.ndarray, among: list[int]) -> int:
    """The least complex, then the least item weight, then the best mean, then the earlier."""
    return min(among, key=lambda i: (candidates[i].complexity, candidates[i].item_weight, -means[i], i))


def pick_simplest_within_se(candidates: list[Blend], means: np.ndarray, se: np.ndarray) -> int:
    """The one-standard-error rule with an item model alone as the simplest: among the candidates
    within one paired SE of the best, the least complex, then the least item weight, then the best."""
    return _simplest(candidates, means, _within_one_se_of_best(means, se))


def pick_best(candidates: list[Blend], means: np.ndarray, se: np.ndarray) -> int:
    """The best mean on validation (ties: the earlier)."""
    return int(np.argmax(means))


def pick_encoder_unless_beaten(candidates: list[Blend], means: np.ndarray, se: np.ndarray) -> int:
    """The best candidate that keeps the encoder, unless the best item model alone is ahead of it by
    more than one paired standard error (then that item model alone)."""
    with_encoder = [i for i, c in enumerate(candidates) if c.encoder]
    alone = [i for i, c in enumerate(candidates) if not c.encoder]
    if not with_encoder or not alone:
        return int(np.argmax(means))
    e = max(with_encoder, key=lambda i: (means[i], -i))
    a = max(alone, key=lambda i: (means[i], -i))
    return a if means[a] - means[e] > se[a, e] else e


def pick_encoder_first_within_se(candidates: list[Blend], means: np.ndarray, se: np.ndarray) -> int:
    """The one-standard-error rule among the candidates that keep the encoder (least complex, then
    least item weight); an item model alone only when no candidate with the encoder is within one
    paired SE of the best."""
    eligible = _within_one_se_of_best(means, se)
    return _simplest(candidates, means, [i for i in eligible if candidates[i].encoder] or eligible)


BLEND_RULES = {"encoder-unless-beaten": pick_encoder_unless_beaten, "best": pick_best,
               "simplest-within-se": pick_simplest_within_se, "encoder-first-within-se": pick_encoder_first_within_se}
# The rule a run uses: on held-out validation users (`fedrec bench blend-rule`) level with the best
# mean, 2-5% above the old one-SE rule (simplest-within-se) on ML-100K, whole and cut to 8 events,
# and within -1.2%..+2% of it on ml-latest-small and a synthetic sparse log, where that rule dropped
# the encoder in 63-82% of draws (docs/results.md, "Session 16").
BLEND_RULE = "encoder-unless-beaten"


def choose_from_statistics(candidates: list[Blend], statistics: np.ndarray, users: float,
                           rule: str = BLEND_RULE) -> tuple[Blend, dict]:
    """The blend that `rule` (BLEND_RULES) picks from summed `blend_statistics` of the validation
    NDCG@10. The best of 38 on a few hundred users is partly the luckiest (the winner's curse), so
    all rules but `best` weigh the paired standard errors. Returns (the blend, what a summary says about it)."""
    k = len(candidates)
    means, pair_se = paired_moments(statistics, users, k)
    best = int(np.argmax(means))
    se = pair_se[:, best]
    chosen = BLEND_RULES[rule](candidates, means, pair_se)
    table = {c.label: float(m) for c, m in zip(candidates, means)}
    alone = {c.label: float(m) for c, m in zip(candidates, means) if not c.encoder}
    simple = max(alone, key=alone.get, default=None)
    why = (f"rule {rule}, best on {int(round(users))} users' validation items: {candidates[best].label} "
           f"{means[best]:.4f}; chosen: {means[chosen]:.4f}, {means[best] - means[chosen]:.4f} below it (paired SE "
           f"{se[chosen]:.4f})")
    if simple is not None:
        why += f"; the best item model alone: {simple} {alone[simple]:.4f}"
    if ENCODER_ALONE.label in table:
        why += f"; the encoder alone {table[ENCODER_ALONE.label]:.4f}"
    report = {"chosen": candidates[chosen].label, "blend": candidates[chosen].to_dict(), "why": why, "rule": rule,
              "best_on_validation": candidates[best].label, "valid_ndcg@10": table,
              "paired_se_against_best": {c.label: float(e) for c, e in zip(candidates, se)},
              "valid_users": int(round(users))}
    return candidates[chosen], report


def choose_weight(encoder: Scorer, items: Scorer, histories: list[np.ndarray], targets: np.ndarray,
                  weights=WEIGHTS) -> tuple[float, dict[float, float]]:
    """One item model's weight (0, one of `weights`, or ITEM_ONLY) chosen on these (validation)
    histories and targets by `choose_from_statistics`, and the NDCG@10 of each weight tried."""
    candidates = blends(("items",), weights)
    per_user = blend_ndcg(encoder, {"items": items}, candidates, histories, targets)
    chosen, _ = choose_from_statistics(candidates, blend_statistics(per_user), len(histories))
    return chosen.weight, {c.weight: float(m) for c, m in zip(candidates, per_user.mean(axis=0))}


def device_blend_ndcg(encoder: Scorer, cooccurrence: np.ndarray, train: np.ndarray, valid: int,
                      kinds: tuple[str, ...], fusion: FusionConfig) -> np.ndarray:
    """One device's part of the federated blend choice: the NDCG@10 of its validation item under each
    candidate of `blends(kinds)`, its history its training items, the item models (with `fusion`'s
    settings) fit from `cooccurrence`: the summed counts less this device's validation item
    (`shared/privacy/cooccurrence.py: without_own_validation`), so its held-out item cannot help the
    item models it judges."""
    co = np.maximum(cooccurrence, 0.0)   # a server's crafted counts could go below this device's own
    items = {kind: fusion.item_model(kind, co) for kind in kinds}
    return blend_ndcg(encoder, items, blends(kinds), [np.asarray(train, dtype=np.int64)], np.array([valid]))[0]
