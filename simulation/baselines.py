"""Reference recommenders tuned on validation, never on test: each setting of a baseline's search
space is fit on the training items and scored on the validation items; the best (NDCG@10) is
refit on train + validation, like our model after its refit, and scored once on test.

The search spaces are in SEARCH_SPACES and in every report, so a reader can see what each
baseline was allowed. Settings that only change how a history is scored (the recency decay, how
many recent items) reuse one fit.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.shared.data.preprocess import Split, with_validation_in_train
from fedrec.shared.evaluation.baselines import EASE, ItemKNN, MostPopular, SessionKNN
from fedrec.shared.evaluation.ranking import evaluate, histories_and_targets, subset_metrics
from fedrec.shared.model.fusion import Blend, FusedScorer, choose_weight
from fedrec.shared.report import write_json

SEARCH_SPACES: dict[str, dict[str, list]] = {
    "most-popular": {},
    "item-knn": {"neighbours": [25, 50, 100, 200, 400], "shrink": [0.0, 10.0, 50.0], "decay": [1.0]},
    "item-knn-recency": {"neighbours": [25, 50, 100, 200, 400], "shrink": [0.0, 10.0, 50.0],
                         "decay": [1.0, 0.9, 0.8, 0.7, 0.5, 0.3]},
    "ease": {"l2": [50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0], "decay": [1.0]},
    "ease-recency": {"l2": [50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0], "decay": [1.0, 0.95, 0.9, 0.8, 0.7, 0.5]},
    "session-knn": {"neighbours": [50, 100, 200, 500], "recent": [5, 10, 20, 50, 1000], "linear": [False, True]},
}
MAKERS = {"most-popular": MostPopular, "item-knn": ItemKNN, "item-knn-recency": ItemKNN, "ease": EASE,
          "ease-recency": EASE, "session-knn": SessionKNN}
SCORING_ONLY = ("decay", "recent", "linear")   # change the scoring, not the fit


@dataclass
class Tuned:
    name: str
    settings: dict
    valid_ndcg: float
    test: dict
    ranks: np.ndarray
    seconds: float
    tried: int


def select(name: str, split: Split, space: dict[str, list] | None = None) -> tuple[dict, float, int]:
    """The setting of `name`'s search space with the best validation NDCG@10 (fit on the training
    items): (settings, its validation NDCG@10, settings tried)."""
    space = SEARCH_SPACES[name] if space is None else space
    keys = list(space)
    fitted: dict[tuple, object] = {}
    best: tuple[float, dict] | None = None
    tried = 0
    for values in itertools.product(*(space[k] for k in keys)):
        settings = dict(zip(keys, values))
        valid = evaluate(_fitted(name, settings, split, fitted), split, "valid").metrics["ndcg@10"]
        tried += 1
        if best is None or valid > best[0]:
            best = (valid, settings)
    assert best is not None
    return best[1], best[0], tried


def fit_selected(name: str, settings: dict, split: Split):
    """`name` with `settings`, fit on `split`'s training items."""
    return _fitted(name, settings, split, {})


def tune(name: str, split: Split, space: dict[str, list] | None = None, *, sampled_negatives: int = 0,
         seed: int = 0) -> Tuned:
    """`select`, then the chosen setting refit on train + validation and scored on test (also
    against `sampled_negatives` sampled items, when > 0)."""
    started = time.perf_counter()
    settings, valid, tried = select(name, split, space)
    test = evaluate(fit_selected(name, settings, with_validation_in_train(split)), split, "test",
                    sampled_negatives=sampled_negatives, seed=seed)
    return Tuned(name, settings, valid, test.metrics, test.ranks, time.perf_counter() - started, tried)


def _fitted(name: str, settings: dict, split: Split, cache: dict):
    fit_keys = tuple(sorted((k, v) for k, v in settings.items() if k not in SCORING_ONLY))
    if fit_keys not in cache:
        cache[fit_keys] = MAKERS[name](**dict(fit_keys)).fit(split)
    model = cache[fit_keys]
    for key, value in settings.items():
        if key in SCORING_ONLY:
            setattr(model, key, value)
    return model


def tune_all(split: Split, out: Path, names=tuple(SEARCH_SPACES), *, progress: bool = True,
             sampled_negatives: int = 0, seed: int = 0, tie_free: np.ndarray | None = None) -> list[dict]:
    """Tune every baseline; each writes OUT/<name>/test_ranks.npy (for `fedrec compare`) and
    settings.json. Returns one row per baseline (with `tie_free`, a mask of users, also their
    metrics: `tie_free_users`)."""
    rows: list[dict] = []
    for name in names:
        tuned = tune(name, split, sampled_negatives=sampled_negatives, seed=seed)
        rows.append(_saved_row(out, name, {
            **tuned.test, "valid_ndcg@10": tuned.valid_ndcg, "settings": tuned.settings,
            "search_space": SEARCH_SPACES[name], "settings_tried": tuned.tried,
            "fit_seconds": round(tuned.seconds, 2)}, tuned.ranks, tie_free))
        if progress:
            print(f"{name}: valid NDCG@10 {tuned.valid_ndcg:.4f}, test {tuned.test['ndcg@10']:.4f} "
                  f"with {tuned.settings} ({tuned.tried} tried, {tuned.seconds:.0f} s)", flush=True)
    return rows


def fused_baselines(split: Split, first: str, second: str, out: Path, *, sampled_negatives: int = 0,
                    seed: int = 0, tie_free: np.ndarray | None = None) -> dict:
    """Two tuned baselines fused as fedrec fuses its encoder (shared/model/fusion.py), the weight
    chosen on validation: the ensemble baseline an ensemble of ours should be measured against."""
    started = time.perf_counter()
    chosen = {name: select(name, split)[0] for name in (first, second)}
    histories, targets = histories_and_targets(split, "valid")
    weight, _ = choose_weight(fit_selected(first, chosen[first], split), fit_selected(second, chosen[second], split),
                              histories, targets)
    everything = with_validation_in_train(split)
    scorer = FusedScorer(fit_selected(first, chosen[first], everything),
                         {second: fit_selected(second, chosen[second], everything)}, Blend.of(second, weight))
    test = evaluate(scorer, split, "test", sampled_negatives=sampled_negatives, seed=seed)
    return _saved_row(out, f"{first} + {second}", {
        **test.metrics, "settings": {first: chosen[first], second: chosen[second], "weight": weight},
        "fit_seconds": round(time.perf_counter() - started, 2)}, test.ranks, tie_free)


def _saved_row(out: Path, method: str, row: dict, ranks: np.ndarray, tie_free: np.ndarray | None) -> dict:
    """One baseline's report row; its ranks (for `fedrec compare`) and the row go to OUT/<folder>/."""
    folder = method.replace(" + ", "+")
    row = {"method": method, **row, "folder": folder}
    if tie_free is not None:
        row["tie_free_users"] = subset_metrics(ranks, tie_free)
    (Path(out) / folder).mkdir(parents=True, exist_ok=True)
    np.save(Path(out) / folder / "test_ranks.npy", ranks)
    write_json(Path(out) / folder / "settings.json", row)
    return row
