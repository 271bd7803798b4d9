"""The public catalog bundle: what the server and every client share about the items.

item ids, the content feature matrix (text embeddings, genres, year), and what a person reads
(titles, genres). Public by nature (the catalog is the service's own data), so it is written
once and shipped with the app or fetched once by a device; it never travels in a training round.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CatalogBundle:
    item_ids: np.ndarray   # (N,) original ids, catalog index i + 1 = item_ids[i]
    content: np.ndarray    # (N+1, C) float32, row 0 pads; C may be 0
    titles: np.ndarray | None = None   # (N,) str; None: the ids stand in
    genres: np.ndarray | None = None   # (N,) str, "|"-joined

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def content_dim(self) -> int:
        return int(self.content.shape[1])

    @property
    def display_titles(self) -> np.ndarray:
        """(N,) what to show for each item: its title, or its id when it has none."""
        ids = np.asarray(self.item_ids, dtype=str)
        if self.titles is None:
            return ids
        titles = np.asarray(self.titles, dtype=str)
        return np.where(titles == "", ids, titles)


def catalog_of(item_ids, content: np.ndarray, frame=None) -> CatalogBundle:
    """The bundle for items `item_ids` (catalog order) from a catalog frame indexed by item id
    (shared/data/schema.py); no frame: ids only."""
    if frame is None:
        return CatalogBundle(np.asarray(item_ids, dtype=str), content)
    rows = frame.loc[list(item_ids)]
    return CatalogBundle(np.asarray(item_ids, dtype=str), content, np.asarray(rows["title"], dtype=str),
                         np.asarray(["|".join(g) for g in rows["genres"]], dtype=str))


def save_catalog(bundle: CatalogBundle, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    extra = {k: np.asarray(v, dtype=str) for k, v in (("titles", bundle.titles), ("genres", bundle.genres))
             if v is not None}
    np.savez(tmp, item_ids=np.asarray(bundle.item_ids, dtype=str), content=bundle.content.astype(np.float32), **extra)
    tmp.replace(path)


def load_catalog(path: Path) -> CatalogBundle:
    with np.load(path, allow_pickle=False) as f:   # a file from elsewhere runs no code
        return CatalogBundle(f["item_ids"], f["content"], f["titles"] if "titles" in f else None,
                             f["genres"] if "genres" in f else None)
