"""A synthetic recommendation world for scale tests and benchmarks (no license, any size).

  - T topics; each item belongs to one topic; within a topic, item popularity is Zipf-like
    (power law with exponent `zipf`)
  - each user mixes a few topics (Dirichlet weights over `interests_per_user` of them) and
    drifts: the mixture moves from a start mixture to an end mixture over the user's timeline
  - history length is log-normal around `mean_events` (at least 3, so every user can be split)
  - item text is drawn from per-topic vocabularies, so content features carry real signal

Vectorised numpy throughout: 100k users x 100k items (about 2M events) in a few seconds.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.shared.data.schema import Dataset, make_catalog, make_interactions

_SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zu", "bre", "dra", "fin",
              "gor", "hal", "jun", "kel", "mor", "nix", "oth", "pra", "quo", "sel", "tir"]


def _vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    parts = rng.choice(_SYLLABLES, size=(size, 3))
    return np.array(["".join(p) for p in parts])


def generate(n_users: int = 1000, n_items: int = 2000, *, n_topics: int = 20,
             interests_per_user: int = 3, mean_events: float = 20.0, zipf: float = 1.1,
             drift: float = 0.5, seed: int = 0, start_time: int = 1_600_000_000) -> Dataset:
    rng = np.random.default_rng(seed)
    n_topics = min(n_topics, n_items)

    # Items: topic, rank within topic -> popularity weight.
    item_topic = rng.integers(0, n_topics, size=n_items)
    order = np.argsort(item_topic, kind="stable")                     # items grouped by topic
    topic_sizes = np.bincount(item_topic, minlength=n_topics)
    topic_start = np.concatenate([[0], np.cumsum(topic_sizes)[:-1]])
    rank_in_topic = np.arange(n_items) - np.repeat(topic_start, topic_sizes)
    weight = 1.0 / (rank_in_topic + 1.0) ** zipf
    # Per-topic cumulative distribution over that topic's items (concatenated, normalised).
    cdf = np.empty(n_items)
    for t in range(n_topics):
        a, b = topic_start[t], topic_start[t] + topic_sizes[t]
        if b > a:
            cdf[a:b] = np.cumsum(weight[a:b]) / weight[a:b].sum()
    topic_popularity = rng.dirichlet(np.ones(n_topics) * 2.0)

    # Users: lengths, start and end interest mixtures over a few topics each.
    lengths = np.maximum(3, rng.lognormal(np.log(mean_events), 0.6, size=n_users).astype(np.int64))
    k = min(interests_per_user, n_topics)
    # k distinct topics per user, drawn by popularity: Gumbel-top-k, one vectorised step.
    keys = np.log(topic_popularity)[None, :] + rng.gumbel(size=(n_users, n_topics))
    user_topics = np.argsort(-keys, axis=1)[:, :k]
    start_mix = rng.dirichlet(np.ones(k), size=n_users)
    end_mix = (1 - drift) * start_mix + drift * rng.dirichlet(np.ones(k), size=n_users)

    # Events: for each, its user, its relative time in [0, 1], the topic from the drifting mix.
    users = np.repeat(np.arange(n_users), lengths)
    offsets = np.arange(len(users)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    progress = offsets / np.maximum(lengths[users] - 1, 1)
    mix = (1 - progress)[:, None] * start_mix[users] + progress[:, None] * end_mix[users]
    choice = (rng.random(len(users))[:, None] > np.cumsum(mix, axis=1)).sum(axis=1)
    topics = user_topics[users, np.minimum(choice, k - 1)]
    # Item within topic by inverse CDF of its power law; empty topics fall back to any item.
    u = rng.random(len(users))
    pos = np.empty(len(users), dtype=np.int64)
    for t in np.unique(topics):
        sel = topics == t
        a, size = topic_start[t], topic_sizes[t]
        pos[sel] = a + np.minimum(np.searchsorted(cdf[a:a + size], u[sel]), size - 1) if size else rng.integers(0, n_items, sel.sum())
    items = order[pos]
    day = 86_400
    timestamps = start_time + (progress * 365 * day).astype(np.int64) + users % day

    frame = pd.DataFrame({"user": users.astype(str), "item": items.astype(str),
                          "timestamp": timestamps, "rating": np.nan,
                          "line": np.arange(1, len(users) + 1)})
    interactions = make_interactions(frame, "<synthetic>")

    catalog = _catalog(rng, item_topic, n_topics)
    return Dataset(f"synthetic-{n_users}x{n_items}", interactions, make_catalog(catalog, "<synthetic>"))


def _catalog(rng: np.random.Generator, item_topic: np.ndarray, n_topics: int) -> pd.DataFrame:
    """Item text from topic vocabularies (with a little shared vocabulary as noise)."""
    n_items = len(item_topic)
    vocab = _vocabulary(rng, n_topics * 30).reshape(n_topics, 30)
    shared_words = _vocabulary(rng, 50)
    words = vocab[item_topic[:, None], rng.integers(0, 30, size=(n_items, 3))]
    noise = shared_words[rng.integers(0, 50, size=n_items)]
    titles = [" ".join(w) + " " + s for w, s in zip(words, noise)]
    return pd.DataFrame({
        "item": np.arange(n_items).astype(str),
        "title": titles,
        "genres": [(f"topic{t}",) for t in item_topic],
        "year": rng.integers(1950, 2025, size=n_items),
    })

