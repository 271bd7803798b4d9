"""`fedrec bench coldstart`: items nobody had interacted with when the model was trained.

Protocol. Each item's first interaction (over every event) dates it; the newest 15% are the cold
items. They are taken out of training entirely: the warm model is trained on each user's events with
the cold items removed, over a catalog without them (so they are not even negatives in its softmax,
as a new item would not be). Then the cold items join the catalog with their content only: their ID
rows are zero, their vectors the item tower's projection of their text, genres and year
(`extend_catalog`). The temporal leave-one-out test stage: every user's last item, the whole catalog
ranked, the user's history (cold items included) excluded, and every item not yet released at the
user's test time (first interaction later than it) left out, for every method; test cases are
reported by whether the target is cold or warm, with paired bootstrap intervals.

Methods, all scored on the same cases:
  ours            the warm model with content (trained with ID dropout), extended to the cold items;
                  `cold_bias_curve` reports what shifting the new items' scores down trades
  warm_reference  the warm model as it would ship without cold-start support (ID dropout 0), the
                  cold items left out of its ranking: the warm targets' reference
  no_content      the warm model trained with IDs only: a cold item has a zero vector, so it ties
                  with every other cold item at score 0
  content_knn     each item's mean cosine (text embeddings when there are any, else the content
                  features) to the user's history items, each weighted decay^age, decay chosen on
                  validation
  newest_release  by release year, newest first: the prior that newness alone carries
  most_popular    training-event counts (a cold item: 0)
  all_items       our model trained with every item, cold items' events included: an upper bound
                  (it saw what the others could not)
Item features here are content only (text, genres, year): popularity and recency counted from the
training log would tell a cold item by its missing counts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedrec.shared.data.pipeline import PreparedData, prepare_data
from fedrec.shared.data.preprocess import Split, UserSplit, with_validation_in_train
from fedrec.shared.evaluation.baselines import MostPopular, history_matrix
from fedrec.shared.evaluation.ranking import evaluate, subset_metrics
from fedrec.shared.model.recommender import RecommenderModel, build_recommender
from fedrec.shared.model.training import fit, model_scorer
from fedrec.shared.recommend import unit_rows
from fedrec.shared.report import write_json

COLD_FRACTION = 0.15
KNN_DECAYS = (1.0, 0.95, 0.9, 0.8, 0.5)


def cold_items(first: np.ndarray, fraction: float = COLD_FRACTION) -> np.ndarray:
    """Indices of the newest `fraction` of items by first interaction (`first_seen`)."""
    seen = np.flatnonzero(np.isfinite(first[1:])) + 1           # never seen: not cold (and never ranked)
    order = seen[np.argsort(first[seen], kind="stable")]        # oldest first
    return np.sort(order[len(order) - int(round(fraction * len(order))):])


def permutation(n_items: int, cold: np.ndarray) -> np.ndarray:
    """old index -> new index: warm items keep their order as 1..W, cold items follow as W+1..N."""
    is_cold = np.zeros(n_items + 1, bool)
    is_cold[cold] = True
    new_order = np.concatenate([[0], np.flatnonzero(~is_cold[1:]) + 1, np.flatnonzero(is_cold[1:]) + 1])
    perm = np.empty(n_items + 1, np.int64)
    perm[new_order] = np.arange(n_items + 1)
    return perm


def permuted(split: Split, perm: np.ndarray) -> Split:
    return Split([UserSplit(u.user_id, perm[u.train], int(perm[u.valid]), int(perm[u.test]), u.train_times)
                  for u in split.users], split.n_items)


def warm_only(split: Split, n_warm: int) -> Split:
    """Each user's train + validation events without cold items (indices > n_warm): the last warm one
    validates, the rest train. Users left with fewer than two warm events train on nothing."""
    users = []
    for u in split.users:
        keep = u.history_for_test <= n_warm
        seq, times = u.history_for_test[keep], np.append(u.train_times, u.train_times[-1:])[keep]
        if len(seq) >= 2:
            users.append(UserSplit(u.user_id, seq[:-1], int(seq[-1]), int(seq[-1]), times[:-1]))
    return Split(users, n_warm)


def extend_catalog(model: RecommenderModel, n_items: int, content: np.ndarray | None = None) -> RecommenderModel:
    """The model over a catalog of `n_items` (the trained items first): the new items get zero ID rows
    and whatever their content (rows of `content`, None for an ID-only model) places them at. Needs an
    unhashed ID table (catalog <= id_buckets): hashed, a new item would share trained rows."""
    cfg = replace(model.cfg, n_items=n_items)
    if n_items > cfg.id_buckets:
        raise ValueError("extending a hashed ID table would give new items trained rows of other items")
    extended = RecommenderModel(cfg, torch.from_numpy(content) if cfg.content_dim else None)
    state = model.state_dict()
    table = torch.zeros_like(extended.item_tower.id_table)
    table[: state["item_tower.id_table"].shape[0]] = state["item_tower.id_table"]
    state["item_tower.id_table"] = table
    extended.load_state_dict(state, strict=False)
    return extended


class ContentKNN:
    """Mean cosine of an item's content embedding to the history items, weighted decay^age."""

    def __init__(self, content: np.ndarray, decay: float):
        self.space, self.decay = unit_rows(content), decay

    def __call__(self, histories: list[np.ndarray]) -> np.ndarray:
        weights = history_matrix(histories, self.space.shape[0], self.decay)
        return np.asarray(weights @ self.space) @ self.space.T


def _without(scorer, n_warm: int):
    def score(histories):
        scores = scorer(histories)
        scores[:, n_warm + 1:] = -np.inf
        return scores
    return score


def _padded(scorer, n_items: int):
    """A scorer over the warm catalog widened to every item (the new ones score 0)."""
    def score(histories):
        scores = scorer(histories)
        return np.pad(scores, ((0, 0), (0, n_items + 1 - scores.shape[1])))
    return score


def _newest_release(years: np.ndarray):
    """(N+1,) release years (NaN unknown) -> the same scores for everyone: newer first."""
    scores = np.where(np.isnan(years), np.nanmin(years) - 1 if np.isfinite(years).any() else 0.0, years)
    return lambda histories: np.tile(scores, (len(histories), 1))


def _train(split: Split, content: np.ndarray | None, job, *, with_content: bool, save: Path):
    torch.manual_seed(job.train.seed)
    hyper = replace(job.model, content=with_content)
    model = build_recommender(hyper, split.n_items, content[: split.n_items + 1] if content is not None else None)
    fit(model, split, job.train)
    torch.save({"model_config": model.cfg.to_dict(), "state_dict": model.state_dict()}, save)
    return model


@dataclass
class ColdSplit:
    split: Split             # every user, items renumbered: warm 1..n_warm, cold after
    warm: Split              # training without the cold items, over the warm catalog
    content: np.ndarray      # (N+1, C) in the new numbering
    n_warm: int
    cold: np.ndarray         # the cold items' original indices
    is_cold_target: np.ndarray
    first_seen: np.ndarray   # (N+1,) each item's first interaction time, new numbering
    test_times: np.ndarray   # (users,) each user's test event time
    years: np.ndarray        # (N+1,) release year (NaN unknown), new numbering
    text: np.ndarray         # (N+1, T) the text embedding block when there is one, else the content

    @property
    def n_items(self) -> int:
        return self.split.n_items


def first_seen(prepared: PreparedData) -> np.ndarray:
    first = np.full(prepared.split.n_items + 1, np.inf)
    for seq, times in zip(prepared.encoded.sequences, prepared.encoded.timestamps):
        np.minimum.at(first, seq, times.astype(np.float64))
    return first


def cold_split(prepared: PreparedData, fraction: float) -> ColdSplit:
    from fedrec.shared.data.features import MINILM, TEXT_DIM
    seen = first_seen(prepared)
    cold = cold_items(seen, fraction)
    perm = permutation(prepared.split.n_items, cold)
    n_warm = prepared.split.n_items - len(cold)
    content = np.empty_like(prepared.features.matrix)
    content[perm] = prepared.features.matrix
    first, years = np.empty(len(perm)), np.full(len(perm), np.nan)
    first[perm] = seen
    years[perm[1:]] = prepared.dataset.catalog.frame["year"].to_numpy(dtype=float, na_value=np.nan)
    split = permuted(prepared.split, perm)
    text = content[:, :TEXT_DIM] if prepared.features.text_encoder == MINILM else content
    by_user = dict(zip(prepared.encoded.user_ids, prepared.encoded.timestamps))
    return ColdSplit(split, warm_only(split, n_warm), content, n_warm, cold,
                     np.array([u.test > n_warm for u in split.users]), first,
                     np.array([float(by_user[u.user_id][-1]) for u in split.users]), years, text)


def _scorers(data: ColdSplit, job, id_dropout: float, out: Path, log) -> tuple[dict, dict]:
    """Each method's scorer over the whole catalog, and content-kNN's validation figures."""
    content, n_items, n_warm = data.content, data.n_items, data.n_warm
    scorers = {}
    log("training ours (warm items, with content)")
    ours_job = replace(job, model=replace(job.model, id_dropout=id_dropout))
    ours = extend_catalog(_train(data.warm, content, ours_job, with_content=True, save=out / "ours.pt"), n_items, content)
    scorers["ours"] = model_scorer(ours)
    # The same model with the cold items kept out of the ranking: what adding them costs the warm targets.
    scorers["ours_without_cold_items"] = _without(model_scorer(ours), n_warm)
    log("training warm_reference (warm items, with content, no ID dropout)")
    reference_job = replace(job, model=replace(job.model, id_dropout=0.0))
    reference = _train(data.warm, content, reference_job, with_content=True, save=out / "warm_reference.pt")
    scorers["warm_reference"] = _without(model_scorer(extend_catalog(reference, n_items, content)), n_warm)
    log("training no_content (warm items, IDs only)")
    no_content = _train(data.warm, None, job, with_content=False, save=out / "no_content.pt")
    scorers["no_content"] = model_scorer(extend_catalog(no_content, n_items))
    valid = {d: evaluate(ContentKNN(data.text[: n_warm + 1], d), data.warm, "valid").metrics["ndcg@10"]
             for d in KNN_DECAYS}
    scorers["content_knn"] = ContentKNN(data.text, max(valid, key=valid.get))
    scorers["newest_release"] = _newest_release(data.years)
    scorers["most_popular"] = _padded(MostPopular().fit(with_validation_in_train(data.warm)), n_items)
    log("training all_items (every item, with content: the warm targets' reference)")
    scorers["all_items"] = model_scorer(_train(data.split, content, job, with_content=True, save=out / "all_items.pt"))
    return scorers, {"content_knn": valid}


COLD_BIASES = (0.0, -0.25, -0.5, -1.0, -2.0)   # in units of the sd of the user's scores over the catalog


def _shifted(scorer, n_warm: int, bias: float):
    """`scorer` with `bias` x (the user's score sd) added to every item past n_warm (the new ones)."""
    def score(histories):
        scores = scorer(histories)
        finite = np.where(np.isfinite(scores), scores, np.nan)
        scores[:, n_warm + 1:] += bias * np.nanstd(finite, axis=1, keepdims=True)
        return scores
    return score


def cold_bias_curve(scorer, data: "ColdSplit") -> list[dict]:
    """The exposure trade-off: new items' scores shifted down by each of COLD_BIASES; NDCG@10 on the
    validation stage (training events as history, new items included; the validation item as target)
    and on test, cold and warm. Not used to choose: the warm validation items were trained on in the
    refit epochs, so validation favours the trained items and would shift the new ones out of sight."""
    rows = []
    for b in COLD_BIASES:
        shifted = _shifted(scorer, data.n_warm, b)
        ranks = released_ranks(shifted, data)
        rows.append({"bias": b, "valid_ndcg@10": round(evaluate(shifted, data.split, "valid").metrics["ndcg@10"], 4),
                     **{f"{group}_ndcg@10": round(subset_metrics(ranks, mask)["ndcg@10"], 4)
                        for group, mask in (("cold", data.is_cold_target), ("warm", ~data.is_cold_target))}})
    return rows


def released_ranks(scorer, data: ColdSplit, stage: str = "test", batch: int = 256) -> np.ndarray:
    """(users, 2) rank spans of each user's target, the history excluded and every item first seen
    after the user's test event left out (it did not exist yet)."""
    from fedrec.shared.evaluation.metrics import exclude_seen, target_ranks
    from fedrec.shared.evaluation.ranking import histories_and_targets
    histories, targets = histories_and_targets(data.split, stage)
    out = []
    for start in range(0, len(histories), batch):
        scores = np.array(scorer(histories[start:start + batch]), dtype=np.float64)
        exclude_seen(scores, histories[start:start + batch])
        scores[data.first_seen[None, :] > data.test_times[start:start + batch, None]] = -np.inf
        out.append(target_ranks(scores, targets[start:start + batch]))
    return np.concatenate(out)


def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int = 4000, seed: int = 0) -> list[float]:
    """95% bootstrap interval (over users) of mean(b) - mean(a), per-user values paired."""
    rng = np.random.default_rng(seed)
    diffs = b - a
    means = [diffs[rng.integers(0, len(diffs), len(diffs))].mean() for _ in range(resamples)]
    return [round(float(q), 4) for q in np.quantile(means, [0.025, 0.975])]


def _by_group(scorers: dict, data: ColdSplit) -> tuple[dict, dict]:
    from fedrec.shared.evaluation.metrics import ndcg
    report = {"cold": {}, "warm": {}, "all": {}}
    groups = (("cold", data.is_cold_target), ("warm", ~data.is_cold_target), ("all", np.ones(len(data.split), bool)))
    per_user = {}
    for name, scorer in scorers.items():
        ranks = released_ranks(scorer, data)
        per_user[name] = ndcg(ranks, 10)
        for group, mask in groups:
            if name == "ours_without_cold_items" and group != "warm":   # a warm-only ranking
                continue
            m = subset_metrics(ranks, mask)
            report[group][name] = {"ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"], "users": int(mask.sum())}
    cold, warm = data.is_cold_target, ~data.is_cold_target
    intervals = {"cold: ours - content_knn": paired_interval(per_user["content_knn"][cold], per_user["ours"][cold]),
                 "cold: ours - newest_release": paired_interval(per_user["newest_release"][cold],
                                                                per_user["ours"][cold]),
                 "warm: ours - warm_reference": paired_interval(per_user["warm_reference"][warm],
                                                                per_user["ours"][warm])}
    return report, intervals


def _ratio(a: float, b: float) -> float:
    return round(a / max(b, 1e-12), 4)


def run_coldstart_bench(job, out: Path, *, fraction: float = COLD_FRACTION, id_dropout: float = 0.1,
                        progress: bool = True) -> dict:
    """`job`: a CentralizedJob (data, model, training settings); `ours` is trained with `id_dropout` (what
    teaches the content projection to place an item alone), the all-items reference with the job's."""
    started = time.perf_counter()
    torch.set_num_threads(job.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(replace(job.data, activity_features=False), show_progress=progress)
    data = cold_split(prepared, fraction)
    log = (lambda message: print(f"coldstart: {message}", flush=True)) if progress else (lambda message: None)
    log(f"{len(data.cold)} cold items of {data.n_items}; {int(data.is_cold_target.sum())} of {len(data.split)} "
        "test targets are cold")
    scorers, chosen = _scorers(data, job, id_dropout, out, log)
    knn_valid = chosen["content_knn"]
    report, intervals = _by_group(scorers, data)
    cold, warm = report["cold"], report["warm"]
    result = {**report, "dataset": prepared.dataset.name, "ours_id_dropout": id_dropout,
              "cold_items": len(data.cold), "items": data.n_items, "cold_fraction": fraction,
              "content_knn_decay": max(knn_valid, key=knn_valid.get), "content_knn_valid_ndcg@10": knn_valid,
              "ours_cold_bias_curve": cold_bias_curve(scorers["ours"], data),
              "checks": {"ours_beats_content_knn_on_cold": bool(cold["ours"]["ndcg@10"] > cold["content_knn"]["ndcg@10"]),
                         "warm_ours_over_warm_reference": _ratio(warm["ours"]["ndcg@10"],
                                                                 warm["warm_reference"]["ndcg@10"]),
                         "warm_ours_over_all_items": _ratio(warm["ours"]["ndcg@10"], warm["all_items"]["ndcg@10"]),
                         "cold_over_warm_ours": _ratio(cold["ours"]["ndcg@10"], warm["ours"]["ndcg@10"])},
              "warm_cost": {"of_id_dropout": _ratio(warm["ours_without_cold_items"]["ndcg@10"],
                                                    warm["warm_reference"]["ndcg@10"]),
                            "of_adding_the_new_items_to_the_ranking": _ratio(warm["ours"]["ndcg@10"],
                                                                             warm["ours_without_cold_items"]["ndcg@10"]),
                            "of_not_training_on_the_newest_items (all_items, an upper bound)": _ratio(
                                warm["warm_reference"]["ndcg@10"], warm["all_items"]["ndcg@10"])},
              "protocol": __doc__.split("Methods")[0].strip(), "wall_seconds": round(time.perf_counter() - started, 1),
              "config": {"model": job.model.to_dict(), "train": job.train.to_dict(), "seed": job.train.seed}}
    result["checks"]["warm_within_2_percent_of_reference"] = result["checks"]["warm_ours_over_warm_reference"] >= 0.98
    result["paired_intervals_ndcg@10_difference"] = intervals
    result["features"] = {"text_encoder": prepared.features.text_encoder, "content_dim": prepared.features.dim,
                          "content_sum": float(prepared.features.matrix.astype(np.float64).sum())}
    write_json(out / "coldstart.json", result)
    text = _summary(result, [name for name in scorers if name != "ours_without_cold_items"])
    (out / "coldstart.md").write_text(text + "\n")
    print(text)
    return result


def _summary(result: dict, names: list[str]) -> str:
    cold_targets = result["cold"]["ours"]["users"]
    lines = [f"# fedrec bench coldstart: {result['dataset']}, newest {result['cold_fraction']:.0%} of items cold "
             f"({result['cold_items']} items, {cold_targets} cold test targets)", "",
             "| method | cold NDCG@10 | cold HR@10 | warm NDCG@10 | warm HR@10 | all NDCG@10 |", "|---|---|---|---|---|---|"]
    for name in names:
        c, w, a = result["cold"][name], result["warm"][name], result["all"][name]
        lines.append(f"| {name} | {c['ndcg@10']:.4f} | {c['hr@10']:.4f} | {w['ndcg@10']:.4f} | {w['hr@10']:.4f} | "
                     f"{a['ndcg@10']:.4f} |")
    checks, cost = result["checks"], result["warm_cost"]
    lines += ["", f"ours (id-dropout {result['ours_id_dropout']}) beats content-kNN on cold targets: "
              f"{checks['ours_beats_content_knn_on_cold']}; warm, ours / warm reference: "
              f"{checks['warm_ours_over_warm_reference']:.4f} = {cost['of_id_dropout']:.4f} (ID dropout) x "
              f"{cost['of_adding_the_new_items_to_the_ranking']:.4f} (the new items in the ranking)",
              "paired 95% intervals of NDCG@10 differences: " + "; ".join(
                  f"{k} [{v[0]}, {v[1]}]" for k, v in result["paired_intervals_ndcg@10_difference"].items())]
    return "\n".join(lines)
