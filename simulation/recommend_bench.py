"""What a user of the published bundle gets, measured on the run's own test users.

`fedrec bench diversity`: MMR re-ranking at several strengths: NDCG@10 of the test item in the
re-ranked list, intra-list diversity (mean pairwise 1 - cosine of content embeddings), coverage@10
and novelty, as a table and a plot.

`fedrec bench recommend`:
  explanations   counterfactual faithfulness: without the 1 or 2 history items shown as reasons, how
                 often a recommendation leaves the top 10, against removing as many random history
                 items (and the by-construction check: the top reason's removal costs most); the
                 time to explain a top 10
  new users      test users cut to their first 0, 1 or 2 events (the test item stays the target): ours,
                 most-popular and content-kNN
  two-stage      the device sends only its (noisy) user vector for 200 candidates and re-ranks them
                 itself: NDCG@10 by noise level against the full on-device ranking
  dynamic        time from a new event to the new top 10 on the device
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedrec.client.recommend import local_candidates, two_stage
from fedrec.shared.data.pipeline import DataConfig, PreparedData, prepare_data
from fedrec.shared.evaluation.metrics import coverage, novelty
from fedrec.shared.evaluation.ranking import histories_and_targets
from fedrec.shared.recommend import Recommender, intra_list_diversity, unit_rows
from fedrec.shared.report import write_json

DIVERSITY_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
NOISE_LEVELS = (0.0, 0.02, 0.05, 0.1, 0.2)   # per coordinate, on a unit-length vector


class BundleMismatch(ValueError):
    """The bundle was not trained on this dataset's items."""


def _load(bundle: Path, data: DataConfig) -> tuple[Recommender, PreparedData]:
    rec = Recommender.load(bundle)
    prepared = prepare_data(data)
    if list(rec.item_ids) != [str(i) for i in prepared.encoded.item_ids]:
        raise BundleMismatch(f"{bundle}: its catalog is not the items of {data.dataset} as prepared here "
                             "(train the bundle with the same data settings)")
    return rec, prepared


def _list_ndcg(top: np.ndarray, target: int) -> float:
    hit = np.flatnonzero(top == target)
    return float(1.0 / np.log2(hit[0] + 2)) if len(hit) else 0.0


def _item_users(prepared: PreparedData) -> np.ndarray:
    counts = np.zeros(prepared.split.n_items + 1)
    for u in prepared.split.users:
        np.add.at(counts, np.unique(u.history_for_test), 1.0)
    return counts


def run_diversity_bench(bundle: Path, data: DataConfig, out: Path, *, users: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rec, prepared = _load(bundle, data)
    histories, targets = histories_and_targets(prepared.split, "test")
    if users:
        histories, targets = histories[:users], targets[:users]
    scores = np.concatenate([rec.scores(histories[i:i + 256]) for i in range(0, len(histories), 256)])
    item_users = _item_users(prepared)
    rows = []
    for d in DIVERSITY_LEVELS:
        tops = np.stack([rec.top(s, 10, exclude=h, diversity=d) for s, h in zip(scores, histories)])
        rows.append({"diversity": d, "ndcg@10": float(np.mean([_list_ndcg(t, y) for t, y in zip(tops, targets)])),
                     "hr@10": float(np.mean([y in t for t, y in zip(tops, targets)])),
                     "intra_list_diversity": intra_list_diversity(tops, rec.content_space),
                     # Not the space MMR optimises in: the collaborative item vectors.
                     "intra_list_diversity_collaborative": intra_list_diversity(tops, rec.similarity_space),
                     "exposure_gini": exposure_gini(tops, rec.n_items),
                     "coverage@10": coverage(tops, rec.n_items),
                     "novelty@10": novelty(tops, item_users, len(prepared.split))})
    result = {"dataset": prepared.dataset.name, "bundle": rec.version, "blend": rec.bundle.blend.label,
              "users": len(histories), "method": "greedy MMR over the best 200 by the blend's score; diversity d: "
              "(1 - d) relevance (scaled to [0, 1]) - d max cosine (content embeddings) to the items already chosen",
              "levels": rows}
    write_json(out / "diversity.json", result)
    _plot_diversity(rows, out / "diversity.png", prepared.dataset.name)
    lines = [f"# fedrec bench diversity: {prepared.dataset.name}, {len(histories)} test users, bundle {rec.version}",
             "", "| diversity | NDCG@10 | HR@10 | intra-list diversity (content) | ILD (collaborative) | "
             "coverage@10 | exposure Gini | novelty@10 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['diversity']:g} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | {r['intra_list_diversity']:.4f} | "
              f"{r['intra_list_diversity_collaborative']:.4f} | {r['coverage@10']:.4f} | {r['exposure_gini']:.3f} | "
              f"{r['novelty@10']:.3f} |" for r in rows]
    (out / "diversity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def exposure_gini(recommended: np.ndarray, n_items: int) -> float:
    """Gini coefficient of how often each catalog item is recommended (0: all equally, 1: one item)."""
    counts = np.sort(np.bincount(recommended[recommended > 0].ravel(), minlength=n_items + 1)[1:]).astype(float)
    if counts.sum() == 0:
        return float("nan")
    ranks = np.arange(1, n_items + 1)
    return float((2 * ranks - n_items - 1) @ counts / (n_items * counts.sum()))


def _plot_diversity(rows: list[dict], path: Path, dataset: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["intra_list_diversity"] for r in rows]
    y = [r["ndcg@10"] for r in rows]
    ax.plot(x, y, marker="o")
    for r in rows:
        ax.annotate(f"d={r['diversity']:g}", (r["intra_list_diversity"], r["ndcg@10"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("intra-list diversity (mean pairwise 1 - cosine, content)")
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"{dataset}: relevance against diversity (MMR)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _faithfulness(rec: Recommender, histories, rng, users: np.ndarray) -> dict:
    """The tautological check (the top explaining item's removal costs more than a random item's: exact
    leave-one-out makes it so) and the informative one: remove the 1 or 2 items shown as "because" and
    see whether the recommendation leaves the top 10, against removing as many random history items."""
    wins = cases = 0
    seconds, empty = [], []
    left = {1: [], 2: []}
    left_random = {1: [], 2: []}
    for u in users:
        history = histories[u]
        if len(np.unique(history)) < 3:
            continue
        started = time.perf_counter()
        scores = rec.scores([history])[0]
        top = rec.top(scores, 10, exclude=history)
        items, drops = rec.leave_one_out(history, top)        # what `explain` ranks by
        seconds.append(time.perf_counter() - started)
        for j, item in enumerate(top):
            order = np.argsort(-drops[:, j], kind="stable")
            empty.append(drops[order[0], j] <= 0)
            other = int(rng.choice([p for p in range(len(items)) if p != order[0]]))
            wins += drops[order[0], j] > drops[other, j]
            cases += 1
            for n in (1, 2):
                shown = items[order[:n]]
                random_items = rng.choice(items, n, replace=False)
                for removed, into in ((shown, left), (random_items, left_random)):
                    rest = history[~np.isin(history, removed)]
                    into[n].append(item not in rec.top(rec.scores([rest])[0], 10, exclude=rest))
    return {"cases": cases, "top_beats_random": round(wins / max(cases, 1), 4),
            "no_reason_shown": round(float(np.mean(empty)), 4),
            "leaves_top10_without_the_shown_reasons": {f"top_{n}": round(float(np.mean(left[n])), 4) for n in left},
            "leaves_top10_without_random_history_items": {f"{n}": round(float(np.mean(left_random[n])), 4)
                                                          for n in left_random},
            "explain_top10_ms": {"p50": round(float(np.percentile(seconds, 50)) * 1e3, 1),
                                 "p99": round(float(np.percentile(seconds, 99)) * 1e3, 1)},
            "method": "exact leave-one-out over the whole history (each distinct item left out once, one batch); "
                      "top_beats_random is true by construction, the counterfactual deletion is the test"}


def _new_users(rec: Recommender, prepared: PreparedData, histories, targets) -> dict:
    item_users = _item_users(prepared)
    content = unit_rows(rec.bundle.catalog.content) if rec.bundle.catalog.content_dim else rec.similarity_space
    out = {}
    for keep in (0, 1, 2):
        result = {"ours": [], "most_popular": [], "content_knn": []} if keep else {"ours": [], "most_popular": []}
        for history, target in zip(histories, targets):
            prefix = history[:keep]
            ours = rec.scores([prefix])[0]
            popular = item_users.copy()
            knn = content @ content[prefix].sum(axis=0)
            for name, scores in (("ours", ours), ("most_popular", popular), ("content_knn", knn))[:len(result)]:
                result[name].append(_list_ndcg(rec.top(scores, 10, exclude=prefix), target))
        out[f"first_{keep}"] = {name: round(float(np.mean(v)), 4) for name, v in result.items()}
    return out


def _reidentified(rec: Recommender, noise: float, trials: int = 300) -> float:
    """Share of one-item histories the server finds from the vector a device sends (two-stage), by the
    nearest of the vectors of every one-item history (it holds the public encoder)."""
    from fedrec.client.recommend import query_vector
    singles = np.stack([query_vector(rec, np.array([i]), 0.0, None) for i in range(1, rec.n_items + 1)])
    items = np.random.default_rng(1).integers(1, rec.n_items + 1, trials)
    found = [int(np.argmax(singles @ query_vector(rec, np.array([i]), noise, f"trial {t}".encode()))) + 1 == i
             for t, i in enumerate(items)]
    return round(float(np.mean(found)), 4)


def _two_stage(rec: Recommender, histories, targets, users: np.ndarray) -> dict:
    targets = targets[users]
    ids = [[str(rec.item_ids[i - 1]) for i in histories[u]] for u in users]
    out = {"on_device": round(float(np.mean([_list_ndcg(rec.indices([r.item_id for r in rec.recommend(h, 10)]), y)
                                              for h, y in zip(ids, targets)])), 4)}
    source = local_candidates(rec)
    for noise in NOISE_LEVELS:
        got = [two_stage(rec, h, 10, source, noise_std=noise, noise_key=f"device {i}".encode())
               for i, h in enumerate(ids)]
        out[f"noise_{noise:g}"] = round(float(np.mean([_list_ndcg(rec.indices([r.item_id for r in g]), y)
                                                       for g, y in zip(got, targets)])), 4)
    out["one_item_history_found_by_the_server"] = {f"noise_{noise:g}": _reidentified(rec, noise)
                                                    for noise in NOISE_LEVELS}
    out["noise"] = "per coordinate, on the unit-length user vector (width " \
                   f"{rec.bundle.item_vectors.shape[1]}): noise norm about std x sqrt(width)"
    return out


def _dynamic(rec: Recommender, histories, users: np.ndarray) -> dict:
    seconds = []
    for history in (histories[u] for u in users):
        ids = [str(rec.item_ids[i - 1]) for i in history]
        first = rec.recommend(ids, 10)
        started = time.perf_counter()
        rec.recommend(ids + [first[0].item_id], 10)
        seconds.append(time.perf_counter() - started)
    return {"event_to_new_top10_ms": {"p50": round(float(np.percentile(seconds, 50)) * 1e3, 2),
                                      "p99": round(float(np.percentile(seconds, 99)) * 1e3, 2)}}


def run_recommend_bench(bundle: Path, data: DataConfig, out: Path, *, users: int = 300, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rec, prepared = _load(bundle, data)
    rng = np.random.default_rng(seed)
    histories, targets = histories_and_targets(prepared.split, "test")
    sample = np.sort(rng.choice(len(histories), min(users, len(histories)), replace=False))   # not the first ids
    users = sample
    result = {"dataset": prepared.dataset.name, "bundle": rec.version, "blend": rec.bundle.blend.label,
              "explanations": _faithfulness(rec, histories, rng, users),
              "new_users": _new_users(rec, prepared, histories, targets),
              "two_stage": _two_stage(rec, histories, targets, users),
              "dynamic": _dynamic(rec, histories, users),
              "users": {"explanations, two-stage, dynamic": len(sample), "new users": len(histories)}}
    write_json(out / "recommend.json", result)
    e, n, t = result["explanations"], result["new_users"], result["two_stage"]
    lines = [f"# fedrec bench recommend: {prepared.dataset.name}, bundle {rec.version} ({rec.bundle.blend.label})",
             f"- explanations: the top explaining item beats a random other history item in "
             f"{e['top_beats_random']:.1%} of {e['cases']} cases (by construction); without the top 1 / top 2 shown "
             f"reasons a recommendation leaves the top 10 in {e['leaves_top10_without_the_shown_reasons']['top_1']:.1%}"
             f" / {e['leaves_top10_without_the_shown_reasons']['top_2']:.1%} of cases, without 1 / 2 random history "
             f"items in {e['leaves_top10_without_random_history_items']['1']:.1%} / "
             f"{e['leaves_top10_without_random_history_items']['2']:.1%}; a top 10 with its explanations takes "
             f"{e['explain_top10_ms']['p50']} ms (p50), {e['explain_top10_ms']['p99']} ms (p99)",
             *(f"- new users, first {k} event(s) only, NDCG@10: " +
               ", ".join(f"{name} {v:.4f}" for name, v in n[f"first_{k}"].items()) for k in (0, 1, 2)),
             "- two-stage (only the user vector leaves the device), NDCG@10: " +
             ", ".join(f"{k} {v}" for k, v in t.items() if k.startswith(("on_", "noise_"))),
             "  one-item histories the server finds from the vector: " +
             ", ".join(f"{k} {v:.1%}" for k, v in t["one_item_history_found_by_the_server"].items()),
             f"- a new event to a new top 10: {result['dynamic']['event_to_new_top10_ms']['p50']} ms (p50)"]
    (out / "recommend.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
