"""Recommendations from a published bundle (shared/bundle.py): the ranker a device runs on its own
history, and the service runs on a user vector.

    rec = Recommender.load("runs/ml-100k-centralized/bundle")
    for r in rec.recommend(["50", "172", "181"], k=10, explain=True):
        print(r.title, [b.title for b in r.because])

Scores are the run's blend: the user encoder's dot product with the item vectors (the item tower
puts each item by its ID row and its content: text, genres, year), standardised and added to the
chosen item models' (recency-weighted EASE or item-kNN over the securely summed co-occurrence
counts, or popularity). The blend was chosen on validation statistics (shared/model/fusion.py).

  recommend      top-k, the history excluded, optionally re-ranked for diversity (MMR over the
                 items' content embeddings) and explained
  explain        each recommended item's "because": the history items whose removal lowers its
                 score most, by exact leave-one-out (every history item left out once, one batch)
  by_vector      scores from a user vector alone (the service's path: no history needed)
  similar_items  nearest items by the cosine of their item vectors

Histories are item ids (strings, as in the catalog), oldest first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedrec.shared.bundle import BundleError, ModelBundle, load_bundle
from fedrec.shared.model.fusion import FusedScorer
from fedrec.shared.model.recommender import RecommenderModel
from fedrec.shared.evaluation.metrics import top_k
from fedrec.shared.model.training import left_pad

CANDIDATE_POOL = 200   # items MMR re-ranks (the best by relevance)
# Below this many items a query scans every item vector; above it, an inverted-file index (faiss
# IVF). Measured with `fedrec bench serve` (docs/results.md, "Serving"), one thread, 64 wide: an
# exact top 10 takes 0.06 ms at 1.7k items, 0.29 ms at 20k, 0.72 ms at 50k, 1.76 ms at 100k (7 ms
# when another job shares the cores). A request's gRPC handling costs about 0.5 ms; past ~20k
# items the scan starts to dominate it, and at 1,000 QPS on 2 cores a request has 2 ms in all.
ANN_FROM_ITEMS = 20_000
TARGET_RECALL = 0.97   # the IVF index's recall@100 against an exact scan, checked when it is built


class VectorIndex:
    """Top-k items by inner product with a user vector: an exact scan, or for a large catalog a faiss
    IVF index whose nprobe is raised until recall@100 on `calibration` queries reaches TARGET_RECALL
    (IVF rather than HNSW: on clustered vectors it reached recall 1.0 at a third of HNSW's p99, and it
    builds in a few seconds)."""

    def __init__(self, item_vectors: np.ndarray, calibration: np.ndarray | None = None, *, ann: bool | None = None):
        self.vectors = np.ascontiguousarray(item_vectors[1:], dtype=np.float32)   # row i = item i + 1
        n, dim = self.vectors.shape
        self.info = {"kind": "exact", "items": n}
        self.ivf = None
        if (n >= ANN_FROM_ITEMS) if ann is None else ann:
            import faiss
            faiss.omp_set_num_threads(1)     # a request is one query: parallelism comes from requests
            nlist = max(1, int(4 * np.sqrt(n)))
            self.ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.ivf.train(self.vectors)
            self.ivf.add(self.vectors)
            self.info = {"kind": "ivf", "items": n, "nlist": nlist, **self._calibrate(calibration)}

    def _calibrate(self, queries: np.ndarray | None) -> dict:
        if queries is None:
            queries = self.vectors[np.random.default_rng(0).integers(0, len(self.vectors), 200)]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(100, len(self.vectors))
        exact = np.argpartition(-(queries @ self.vectors.T), k - 1, axis=1)[:, :k]
        nprobe = 1
        while True:
            self.ivf.nprobe = nprobe
            _, found = self.ivf.search(queries, k)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)]))
            if recall >= TARGET_RECALL or nprobe >= self.ivf.nlist:
                return {"nprobe": nprobe, "calibrated_recall@100": round(recall, 4), "calibration_queries": len(queries)}
            nprobe = min(2 * nprobe, self.ivf.nlist)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) -> scores (B, k) and catalog indices (B, k), best first."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        k = min(k, len(self.vectors))
        if self.ivf is not None:
            scores, found = self.ivf.search(vectors, k)
            return scores, found + 1          # -1 (too few found) becomes 0, the padding item
        scores = vectors @ self.vectors.T
        top = top_k(scores, k)                                # ties to the lower index
        return np.take_along_axis(scores, top, axis=1), top + 1


class UnknownItem(ValueError):
    """An item id that is not in the bundle's catalog."""


@dataclass(frozen=True)
class Because:
    item_id: str
    title: str
    contribution: float    # how much the score drops without this history item


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    title: str
    score: float
    because: list[Because] = field(default_factory=list)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class Recommender:
    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        cfg = bundle.model_config
        content = torch.from_numpy(bundle.catalog.content) if cfg.content_dim else None
        self.model = RecommenderModel(cfg, content)
        try:   # every parameter, or none: a missing one would silently stay at random values
            self.model.load_state_dict({k: torch.from_numpy(v) for k, v in bundle.weights.items()})
        except RuntimeError as err:
            raise BundleError(f"{bundle.path}: the weights do not fit the model the manifest describes: "
                              f"{str(err).splitlines()[0]}") from None
        self.model.eval()
        self.item_table = torch.from_numpy(bundle.item_vectors)
        self.item_ids = np.asarray(bundle.catalog.item_ids, dtype=str)
        self.titles = np.asarray(bundle.catalog.titles, dtype=str)
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        self.scorer = FusedScorer(self.encoder_scores, bundle.item_models, bundle.blend)
        self.similarity_space = unit_rows(bundle.item_vectors)      # row 0 (padding) stays 0
        # Diversity is judged by what items are (their content), not by who used them.
        self.content_space = unit_rows(bundle.catalog.content) if bundle.catalog.content_dim else self.similarity_space
        self._index = None

    @property
    def index_for_vectors(self) -> VectorIndex:
        """The search structure for the by-vector path (built on first use: devices never need it).
        An IVF index is calibrated on user vectors of random histories, what queries look like."""
        if self._index is None:
            calibration = None
            if self.n_items >= ANN_FROM_ITEMS:
                rng = np.random.default_rng(0)
                histories = [rng.integers(1, self.n_items + 1, rng.integers(1, self.model.cfg.max_len + 1))
                             for _ in range(200)]
                calibration = self.user_vectors(histories)
            self._index = VectorIndex(self.bundle.item_vectors, calibration)
        return self._index

    def nearest(self, vector: np.ndarray, k: int, *, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """The k items with the highest inner product with one user vector, `exclude` (indices) left
        out: (indices, scores), best first. Exact or IVF (`index_for_vectors`)."""
        exclude = set(int(i) for i in exclude)
        asked = k + len(exclude)
        while True:   # an IVF search may come back short of `asked`: widen until k are left or all were seen
            scores, found = self.index_for_vectors.search(vector, asked)
            keep = [(int(i), float(s)) for i, s in zip(found[0], scores[0]) if i > 0 and int(i) not in exclude][:k]
            if len(keep) == k or asked >= self.n_items:
                break
            asked = min(2 * asked, self.n_items)
        return np.asarray([i for i, _ in keep], dtype=np.int64), np.asarray([s for _, s in keep])

    @classmethod
    def load(cls, folder: str | Path) -> "Recommender":
        return cls(load_bundle(Path(folder)))

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    # ------------------------------------------------------------------ ids <-> catalog indices
    def indices(self, item_ids) -> np.ndarray:
        out = []
        for item in item_ids:
            if str(item) not in self.index:
                raise UnknownItem(f"item {item!r} is not in the catalog of bundle {self.version}")
            out.append(self.index[str(item)])
        return np.asarray(out, dtype=np.int64)

    def title(self, index: int) -> str:
        return str(self.titles[index - 1])

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def encoder_scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """(B, N+1) the encoder's dot-product scores of index histories (column 0 = padding)."""
        return self.by_vector(self.user_vectors(histories))

    @torch.no_grad()
    def user_vectors(self, histories: list[np.ndarray]) -> np.ndarray:
        """(B, D) each index history's interest vector (what the service's by-vector path takes)."""
        padded = left_pad(histories, self.model.cfg.max_len)
        return self.model.user_encoder(self.item_table[padded], padded)[:, -1].numpy()

    def by_vector(self, user_vectors: np.ndarray) -> np.ndarray:
        scores = np.asarray(user_vectors, dtype=np.float32) @ self.bundle.item_vectors.T
        scores = scores.astype(np.float64)
        scores[:, 0] = -np.inf
        return scores

    def scores_of(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """The blend's scores of `candidates` only (indices), each part standardised over them: what a
        device that cannot score the whole catalog ranks a short list with (client/recommend.py)."""
        blend = self.bundle.blend

        def z(x: np.ndarray) -> np.ndarray:
            return (x - x.mean()) / (x.std() + 1e-12)
        parts = {kind: z(self.bundle.item_models[kind].columns([history], candidates)[0]) for kind in blend.kinds}
        if not blend.encoder:
            return parts[blend.parts[0][0]]
        out = z(self.user_vectors([history])[0].astype(np.float64) @ self.bundle.item_vectors[candidates].T)
        for kind, weight in blend.parts:
            out = out + weight * parts[kind]
        return out

    def scores(self, histories: list[np.ndarray]) -> np.ndarray:
        """(B, N+1) the blend's scores of index histories (column 0 = padding, -inf). A device with no
        history yet is offered the most popular items, where the bundle counted them (measured:
        `fedrec bench recommend`, new users)."""
        scores = self.scorer(histories)
        popularity = self.bundle.popularity
        if popularity is not None:
            for row in (i for i, h in enumerate(histories) if len(h) == 0):
                scores[row] = popularity
                scores[row, 0] = -np.inf
        return scores

    # ------------------------------------------------------------------ top-k
    def top(self, scores: np.ndarray, k: int, *, exclude=(), diversity: float = 0.0) -> np.ndarray:
        """Indices of the k best items of one score row, `exclude` (indices) left out; with
        diversity d in (0, 1], greedy MMR (Carbonell & Goldstein 1998) over the best
        CANDIDATE_POOL: each next item maximises (1 - d) relevance - d max cosine to those
        already chosen, relevance scaled to [0, 1] over the pool."""
        if not 0.0 <= diversity <= 1.0:
            raise ValueError(f"diversity must be in [0, 1], got {diversity}")
        row = np.array(scores, dtype=np.float64)
        if np.isnan(row).any() or (row == np.inf).any():
            raise ValueError("scores are NaN or +inf: the model diverged")
        row[0] = -np.inf
        row[np.asarray(list(exclude), dtype=np.int64)] = -np.inf
        allowed = int(np.isfinite(row).sum())
        k = min(k, allowed)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        pool_size = min(allowed, max(CANDIDATE_POOL, k) if diversity > 0 else k)
        pool = top_k(row[None], pool_size)[0]                 # by score, ties to the lower index
        if diversity == 0:
            return pool[:k]
        relevance = row[pool]
        span = relevance.max() - relevance.min()
        relevance = (relevance - relevance.min()) / (span if span > 0 else 1.0)
        vectors = self.content_space[pool]
        chosen = [0]
        closest = vectors @ vectors[0]                        # max cosine to the chosen, per candidate
        for _ in range(k - 1):
            gain = (1 - diversity) * relevance - diversity * closest
            gain[chosen] = -np.inf
            best = int(np.argmax(gain))
            chosen.append(best)
            closest = np.maximum(closest, vectors @ vectors[best])
        return pool[chosen]

    def recommend(self, history, k: int = 10, *, exclude=(), diversity: float = 0.0, explain: bool = False,
                  because: int = 2) -> list[Recommendation]:
        """Top-k for a history of item ids (oldest first), its items and `exclude` left out."""
        items = self.indices(history)
        scores = self.scores([items])[0]
        top = self.top(scores, k, exclude=np.concatenate([items, self.indices(exclude)]), diversity=diversity)
        reasons = self.explain(items, top, because) if explain and len(items) else [[] for _ in top]
        return [Recommendation(str(self.item_ids[i - 1]), self.title(i), float(scores[i]), r) for i, r in zip(top, reasons)]

    def explain(self, history: np.ndarray, recommended: np.ndarray, because: int = 2) -> list[list[Because]]:
        """For each recommended index, the `because` history items whose removal lowers its score
        most (exact leave-one-out: the blend rescored with each history item left out, one batch),
        only those whose removal does lower it."""
        items, drops = self.leave_one_out(history, recommended)     # (distinct items, len(recommended))
        out = []
        for j in range(len(recommended)):
            order = np.argsort(-drops[:, j], kind="stable")[:because]
            out.append([Because(str(self.item_ids[items[p] - 1]), self.title(items[p]), float(drops[p, j]))
                        for p in order if drops[p, j] > 0])
        return out

    def leave_one_out(self, history: np.ndarray, recommended: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distinct history items, drops): drops[p, j] = score of recommended[j] with the full history -
        its score with every occurrence of item p left out. The blend itself, also for a history that
        becomes empty (not the no-history fallback: that is another scorer)."""
        history = np.asarray(history, dtype=np.int64)
        items = np.unique(history)
        variants = [history[history != item] for item in items]
        full = self.scorer([history])[0, recommended]
        return items, full[None, :] - self.scorer(variants)[:, recommended]

    def similar_items(self, item_id: str, k: int = 10) -> list[Recommendation]:
        """The k items whose item vectors are closest (cosine) to `item_id`'s."""
        index = int(self.indices([item_id])[0])
        scores = (self.similarity_space @ self.similarity_space[index]).astype(np.float64)
        top = self.top(scores, k, exclude=[index])
        return [Recommendation(str(self.item_ids[i - 1]), self.title(i), float(scores[i])) for i in top]


def intra_list_diversity(recommended: np.ndarray, content_space: np.ndarray) -> float:
    """Mean over lists of the mean pairwise 1 - cosine of the items' content embeddings
    (rows of `content_space` are unit vectors); slots of index 0 are ignored."""
    values = []
    for row in np.atleast_2d(recommended):
        row = row[row > 0]
        if len(row) < 2:
            continue
        v = content_space[row]
        sims = v @ v.T
        n = len(row)
        values.append(float((n * n - sims.sum()) / (n * (n - 1))))   # the diagonal's 1s cancel
    return float(np.mean(values)) if values else float("nan")

