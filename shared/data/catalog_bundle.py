"""The public catalog bundle: what the server and every client share about the items.

item ids and the content feature matrix (text embeddings, genres, year). Public by nature
(the catalog is the service's own data), so it is written once and shipped with the app or
fetched once by a device; it never travels in a training round.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CatalogBundle:
    item_ids: np.ndarray   # (N,) original ids, catalog index i + 1 = item_ids[i]
    content: np.ndarray    # (N+1, C) float32, row 0 pads; C may be 0

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def content_dim(self) -> int:
        return int(self.content.shape[1])


def save_catalog(bundle: CatalogBundle, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, item_ids=np.asarray(bundle.item_ids, dtype=str), content=bundle.content.astype(np.float32))
    tmp.replace(path)


def load_catalog(path: Path) -> CatalogBundle:
    with np.load(path) as f:
        return CatalogBundle(f["item_ids"], f["content"])
