"""Recommendations on the device: its history never leaves it.

Default (on-device): the device holds the published bundle (fetched once with GetBundle) and
runs `shared.recommend.Recommender` on its own history: scores, filters what it has seen,
explains, re-ranks. Nothing about the history is sent anywhere.

Two-stage (`two_stage`): the device computes its user vector, optionally adds Gaussian noise,
and sends only that vector to the service's Recommend for a fixed number of candidates (never
its history, never what to exclude: a fixed pool, filtered here); it then re-scores the
candidates with the full blend and re-ranks them locally. The server learns the (noisy) user
vector, which summarises the history (docs/recommend.md); the noise's cost in quality is measured
by `fedrec bench recommend`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from shared.recommend import Recommendation, Recommender

CANDIDATES = 200   # the pool the two-stage path asks for: fixed, so its size says nothing of the history

# user vector (D,), pool size -> candidate item indices (the service, or a local stand-in)
CandidateSource = Callable[[np.ndarray, int], np.ndarray]


def two_stage(rec: Recommender, history: list[str], k: int, candidates: CandidateSource, *,
              noise_std: float = 0.0, pool: int = CANDIDATES, diversity: float = 0.0,
              rng: np.random.Generator | None = None) -> list[Recommendation]:
    """Top-k from candidates fetched by the (noisy) user vector alone, re-ranked here by the blend."""
    items = rec.indices(history)
    vector = rec.user_vectors([items])[0]
    if noise_std > 0:
        vector = vector + (rng or np.random.default_rng()).normal(0.0, noise_std, vector.shape).astype(vector.dtype)
    offered = np.asarray(candidates(vector, pool), dtype=np.int64)
    scores = rec.scores([items])[0]
    restricted = np.full_like(scores, -np.inf)
    restricted[offered] = scores[offered]
    top = rec.top(restricted, k, exclude=items, diversity=diversity)
    return [Recommendation(str(rec.item_ids[i - 1]), rec.title(i), float(scores[i])) for i in top]


def service_candidates(stub, rec: Recommender) -> CandidateSource:
    """The Recommend RPC as a candidate source: it sends the vector, the pool size and the bundle
    version the device holds, nothing else."""
    from shared.proto import recommend_pb2 as pb

    def ask(vector: np.ndarray, pool: int) -> np.ndarray:
        reply = stub.Recommend(pb.RecommendRequest(model_version=rec.version, user_vector=vector.tolist(), k=pool))
        return rec.indices([item.item_id for item in reply.items])
    return ask


def local_candidates(rec: Recommender) -> CandidateSource:
    """What the service computes for a vector, run in-process (for measuring the two-stage path)."""
    return lambda vector, pool: rec.top(rec.by_vector(vector[None])[0], pool)
