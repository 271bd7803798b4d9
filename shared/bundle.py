"""The published model bundle: everything a ranker or a device needs to recommend, in one folder.

A run (centralized or federated) ends by writing one. The service (`fedrec serve`) and devices
(`fedrec recommend`, `fedrec.shared.recommend.Recommender`) load only this, never a run's own files.

  manifest.json              format, version, content hash, each file's SHA-256, the model's
                             shape, the blend, the run's metrics and privacy: written last
  weights-<sha>.npz          the model's parameters (item tower and user encoder)
  items-<sha>.npz            item ids, titles, genres, content features, the item vectors, and
                             where the run counted them, the items' popularity (what a device
                             with no history yet is offered)
  item-models-<sha>.npz      the blend's item models: EASE weights and item-kNN similarities (a
                             matrix the recency-weighted history multiplies), popularity (a vector)

Why this shape:
- Files are named by their content and the manifest is replaced atomically, last. A reader
  (the service reloading while a run publishes) sees the old bundle or the new one, never half
  of each; the old files go once the new manifest is in place.
- Every file is checked against its hash on load: a torn or tampered file is an error that
  names it, never a silently different model.
- numpy archives loaded with allow_pickle=False: a bundle fetched from a server runs no code on
  the device (a torch or pickle file would).

What it reveals, to anyone who gets it (docs/recommend.md): the final shared weights (the same
every training client received), and with a blend the item models fit from the securely summed
co-occurrence counts, an aggregate over all devices that is not differentially private.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fedrec.shared.data.catalog_bundle import CatalogBundle
from fedrec.shared.errors import BundleError
from fedrec.shared.evaluation.baselines import history_matrix
from fedrec.shared.model.config import ModelConfig
from fedrec.shared.model.fusion import ENCODER_ALONE, Blend

FORMAT = "fedrec-bundle/1"
MANIFEST = "manifest.json"
FILE_NAME = re.compile(r"^(weights|items|item-models)-[0-9a-f]{16}\.npz$")   # the only files a bundle has


@dataclass(frozen=True)
class ItemModel:
    """One item model of the blend as a device scores it: the history, each item weighing
    decay^age (0 = newest), times `matrix`; or, for popularity, the same `counts` for everyone."""
    kind: str
    decay: float = 1.0
    matrix: np.ndarray | sp.csr_matrix | None = None   # (N+1, N+1)
    counts: np.ndarray | None = None                    # (N+1,)

    @classmethod
    def of(cls, kind: str, fitted) -> "ItemModel":
        """From a fitted EASE, ItemKNN or MostPopular (shared/evaluation/baselines.py)."""
        if kind == "popular":
            return cls(kind, counts=np.asarray(fitted.counts, dtype=np.float32))
        if kind == "item-knn":   # kept to its top-k neighbours: sparse
            return cls(kind, fitted.decay, matrix=sp.csr_matrix(fitted.similarity.astype(np.float32)))
        return cls(kind, fitted.decay, matrix=np.asarray(fitted.weights, dtype=np.float32))

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        return self.columns(histories, slice(None))

    def columns(self, histories: list[np.ndarray], columns) -> np.ndarray:
        """Scores of the items `columns` (indices, or a slice) only: (B, len(columns))."""
        if self.counts is not None:
            return np.tile(self.counts[columns].astype(np.float64), (len(histories), 1))
        scores = history_matrix(histories, self.matrix.shape[0], self.decay) @ self.matrix[:, columns]
        return np.asarray(scores.toarray() if sp.issparse(scores) else scores, dtype=np.float64)


@dataclass(frozen=True)
class ModelBundle:
    manifest: dict
    model_config: ModelConfig
    weights: dict[str, np.ndarray]
    catalog: CatalogBundle
    item_vectors: np.ndarray              # (N+1, D) the item tower's output, row 0 pads
    item_models: dict[str, ItemModel]
    blend: Blend
    path: Path
    popularity: np.ndarray | None = None  # (N+1,) users per item, where the run counted them

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]


DESCRIPTIVE = ("content_hash", "version", "created", "run")   # what the content hash does not cover


def model_hash(manifest: dict) -> str:
    """SHA-256 of everything that decides the model's scores: the files' hashes, the model's shape,
    the blend and the item models' settings (canonical JSON of the manifest without DESCRIPTIVE)."""
    core = {k: v for k, v in manifest.items() if k not in DESCRIPTIVE}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_addressed(folder: Path, stem: str, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
    """Save `arrays` as folder/stem-<sha>.npz (fsynced); returns (file name, sha256)."""
    tmp = folder / f".{stem}.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    sha = _sha256(tmp)
    name = f"{stem}-{sha[:16]}.npz"
    os.replace(tmp, folder / name)
    return name, sha


def _item_model_arrays(models: dict[str, ItemModel]) -> tuple[dict, dict]:
    arrays, info = {}, {}
    for kind, m in models.items():
        info[kind] = {"decay": m.decay, "storage": "counts" if m.counts is not None else
                      "sparse" if sp.issparse(m.matrix) else "dense"}
        if m.counts is not None:
            arrays[f"{kind}/counts"] = m.counts
        elif sp.issparse(m.matrix):
            for part in ("data", "indices", "indptr"):
                arrays[f"{kind}/{part}"] = getattr(m.matrix, part)
            arrays[f"{kind}/shape"] = np.asarray(m.matrix.shape)
        else:
            arrays[f"{kind}/matrix"] = m.matrix
    return arrays, info


def write_bundle(folder: Path, *, model_config: ModelConfig, weights: dict[str, np.ndarray],
                 item_vectors: np.ndarray, catalog: CatalogBundle, blend: Blend = ENCODER_ALONE,
                 item_models: dict[str, ItemModel] | None = None, popularity: np.ndarray | None = None,
                 run: dict | None = None) -> dict:
    """Publish a bundle in `folder` (created; an older bundle there is replaced atomically).
    `run`: what the manifest says about the run that made it (dataset, mode, metrics, privacy).
    Returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    item_models = item_models or {}
    missing = set(blend.kinds) - set(item_models)
    if missing:
        raise ValueError(f"the blend {blend.label!r} needs item models {sorted(missing)} that were not given")
    models_arrays, models_info = _item_model_arrays({k: item_models[k] for k in blend.kinds})
    files = {}
    files["weights"] = _write_addressed(folder, "weights", {k: np.asarray(v, np.float32) for k, v in weights.items()})
    items = {"item_ids": np.asarray(catalog.item_ids, dtype=str), "titles": catalog.display_titles,
             "content": np.asarray(catalog.content, np.float32),
             "item_vectors": np.asarray(item_vectors, np.float32)}
    if catalog.genres is not None:
        items["genres"] = np.asarray(catalog.genres, dtype=str)
    if popularity is not None:
        items["popularity"] = np.asarray(popularity, np.float32)
    files["items"] = _write_addressed(folder, "items", items)
    files["item_models"] = _write_addressed(folder, "item-models", models_arrays)
    manifest = {
        "format": FORMAT,
        "files": {role: {"name": name, "sha256": sha} for role, (name, sha) in files.items()},
        "model_config": model_config.to_dict(),
        "blend": blend.to_dict(), "blend_label": blend.label,
        "item_models": models_info,
        "items": catalog.n_items,
    }
    content_hash = model_hash(manifest)
    manifest = {**manifest, "content_hash": content_hash,
                "version": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + content_hash[:8],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": run or {}}
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)   # the moment the new bundle is published
    keep = {name for name, _ in files.values()} | {MANIFEST}
    for stale in folder.iterdir():       # the previous bundle's files
        if stale.name not in keep and stale.suffix == ".npz" and not stale.name.startswith("."):
            stale.unlink(missing_ok=True)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no bundle here (no {MANIFEST}); a training run writes one to OUT/bundle (not yet the DP item-item model)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not a readable manifest ({err})") from None
    return check_manifest(manifest, str(path))


def check_manifest(manifest, source: str) -> dict:
    """`manifest` if it is one this fedrec reads, consistent with its content hash, naming only bundle
    files; BundleError naming `source` otherwise."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{source}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"this fedrec reads {FORMAT!r}")
    if manifest.get("content_hash") != model_hash(manifest):
        raise BundleError(f"{source}: its content hash does not match what it describes: edited or tampered with")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {"weights", "items", "item_models"} or not all(
            isinstance(e, dict) and FILE_NAME.fullmatch(str(e.get("name", ""))) and
            re.fullmatch(r"[0-9a-f]{64}", str(e.get("sha256", ""))) for e in files.values()):
        raise BundleError(f"{source}: names files a bundle does not have")
    return manifest


def _load_checked(folder: Path, entry: dict) -> dict[str, np.ndarray]:
    path = folder / entry["name"]        # a bundle file name (check_manifest): never a path elsewhere
    if not path.is_file():
        raise BundleError(f"{path}: missing (the manifest names it)")
    if _sha256(path) != entry["sha256"]:
        raise BundleError(f"{path}: its SHA-256 does not match the manifest: torn or tampered with")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _item_models(arrays: dict, info: dict) -> dict[str, ItemModel]:
    out = {}
    for kind, meta in info.items():
        if meta["storage"] == "counts":
            out[kind] = ItemModel(kind, counts=arrays[f"{kind}/counts"])
        elif meta["storage"] == "sparse":
            matrix = sp.csr_matrix((arrays[f"{kind}/data"], arrays[f"{kind}/indices"], arrays[f"{kind}/indptr"]),
                                   shape=tuple(arrays[f"{kind}/shape"]))
            out[kind] = ItemModel(kind, float(meta["decay"]), matrix=matrix)
        else:
            out[kind] = ItemModel(kind, float(meta["decay"]), matrix=arrays[f"{kind}/matrix"])
    return out


def load_bundle(folder: Path) -> ModelBundle:
    """The bundle in `folder`, every file checked against the manifest (BundleError naming the
    file otherwise)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        weights = _load_checked(folder, manifest["files"]["weights"])
        items = _load_checked(folder, manifest["files"]["items"])
        models = _item_models(_load_checked(folder, manifest["files"]["item_models"]), manifest["item_models"])
        catalog = CatalogBundle(items["item_ids"], items["content"], items["titles"], items.get("genres"))
        return ModelBundle(manifest, ModelConfig(**manifest["model_config"]), weights, catalog,
                           items["item_vectors"], models, Blend.from_dict(manifest["blend"]), folder,
                           items.get("popularity"))
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{folder / MANIFEST}: the bundle is incomplete or inconsistent ({err!r})") from None


def write_model_bundle(folder: Path, model, catalog: CatalogBundle, *, blend: Blend = ENCODER_ALONE,
                       fitted: dict | None = None, popularity: np.ndarray | None = None, run: dict | None = None) -> dict:
    """`write_bundle` for a trained RecommenderModel and the blend's fitted item models (EASE,
    ItemKNN or MostPopular, by kind)."""
    import torch
    model.eval()
    with torch.no_grad():
        item_vectors = model.item_tower.all_items().numpy()
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
               if k in dict(model.named_parameters())}
    return write_bundle(folder, model_config=model.cfg, weights=weights, item_vectors=item_vectors, catalog=catalog,
                        blend=blend, item_models={k: ItemModel.of(k, fitted[k]) for k in blend.kinds},
                        popularity=popularity, run=run)
