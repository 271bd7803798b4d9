"""The centralized job: every user's history in one place, no federation, no privacy.

This is the upper bound the federated and private runs are measured against, run on the
same split with the same model and the same evaluator. Writes to OUT:
  summary.json           metrics on the test stage, config, timings
  validation_curve.png   validation NDCG@10 by epoch
  model.pt               the best model (by validation NDCG@10) and what is needed to reload it
                         (with --fusion, also the item model's settings and the fusion weight)
  test_ranks.npy         each user's rank of their test item (for `fedrec compare`)
  bundle/                the published model (shared/bundle.py): what `fedrec recommend` and
                         `fedrec serve` load
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedrec.shared.data.preprocess import Split, item_popularity, with_validation_in_train
from fedrec.shared.evaluation.ranking import evaluate, histories_and_targets, subset_metrics, tie_free_users
from fedrec.shared.bundle import write_model_bundle
from fedrec.shared.data.catalog_bundle import catalog_of
from fedrec.shared.model.fusion import (BLEND_KINDS, ENCODER_ALONE, FusedScorer, Scorer, blend_ndcg, blend_statistics, blends,
                                 choose_from_statistics)
from fedrec.shared.model.config import ModelHyper
from fedrec.shared.settings import default
from fedrec.shared.model.recommender import RecommenderModel, build_recommender
from fedrec.shared.console import Progress
from fedrec.shared.data.pipeline import DataConfig, PreparedData, prepare_data
from fedrec.shared.report import plot_validation_curve, write_json
from fedrec.shared.model.training import FitResult, TrainConfig, fit, model_scorer


@dataclass
class CentralizedJob:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelHyper = field(default_factory=ModelHyper)
    train: TrainConfig = field(default_factory=TrainConfig)
    threads: int = default("threads")
    fusion: str = default("fusion")
    sampled_negatives: int = 100

    @classmethod
    def from_settings(cls, v: dict) -> "CentralizedJob":
        """From setting keys (shared/settings.py): the data, model and train groups."""
        return cls(data=DataConfig.from_settings(v), model=ModelHyper.from_settings(v),
                   train=TrainConfig.from_settings(v), threads=v["threads"], fusion=v["fusion"])


def build_model(prepared: PreparedData, hyper: ModelHyper) -> RecommenderModel:
    return build_recommender(hyper, prepared.split.n_items, prepared.features.matrix)


def train_centralized(prepared: PreparedData, job: CentralizedJob, *, progress: bool = True):
    """Fit on the training split; returns (model, FitResult)."""
    torch.manual_seed(job.train.seed)
    model = build_model(prepared, job.model)
    bar = Progress(job.train.epochs, "train", "epoch", enabled=progress)
    best: list[float] = []

    def on_epoch(point: dict) -> None:
        if "ndcg@10" in point:   # validated this epoch
            best.append(max(best + [point["ndcg@10"]]))
        bar.update(**{"loss": f"{point['loss']:.3f}",
                      "best validation NDCG@10": f"{best[-1]:.4f}" if best else None})

    result = fit(model, prepared.split, job.train, progress=on_epoch)
    bar.close()
    return model, result


ITEM_MODELS = {"ease": "ease-recency", "item-knn": "item-knn-recency", "popular": "most-popular"}   # -> simulation/baselines.py


def tuned_item_models(split: Split, kinds: tuple[str, ...]) -> tuple[dict, dict[str, Scorer]]:
    """Each item model of `kinds` tuned on validation and fit on the training items: (kind ->
    (settings, valid NDCG@10, settings tried), kind -> its scorer)."""
    from fedrec.simulation.baselines import fit_selected, select
    tuned = {k: select(ITEM_MODELS[k], split) for k in kinds}
    return tuned, {k: fit_selected(ITEM_MODELS[k], tuned[k][0], split) for k in kinds}


def validation_blend_ndcg(model: RecommenderModel, result: FitResult, split: Split, items: dict[str, Scorer]
                          ) -> tuple[list, np.ndarray]:
    """Each user's validation NDCG@10 under every blend of the `items` models (`blends`), with what
    had not seen the validation items: the encoder as selected before its refit, the item models fit
    on the training items (`tuned_item_models`). Returns (candidates, (users, candidates))."""
    selected = copy.deepcopy(model)
    selected.load_state_dict(result.selected_state)
    histories, targets = histories_and_targets(split, "valid")
    candidates = blends(tuple(items))
    return candidates, blend_ndcg(model_scorer(selected), items, candidates, histories, targets)


def fuse_with_item_model(kind: str, model: RecommenderModel, result: FitResult, split: Split) -> tuple[Scorer, dict]:
    """The refit encoder blended with an item model (shared/model/fusion.py): `kind` "ease", "item-knn"
    or "popular", or "auto" for any of them; the blend may also be the encoder alone or the item model
    alone. Every choice is made on validation with what had not seen the validation items: each item
    model's settings (fit on the training items), then the blend, with the encoder as selected before
    its refit. For test the chosen item model is refit on train + validation, as the encoder was."""
    from fedrec.simulation.baselines import SEARCH_SPACES, fit_selected
    kinds = BLEND_KINDS if kind == "auto" else (kind,)
    tuned, items = tuned_item_models(split, kinds)
    candidates, per_user = validation_blend_ndcg(model, result, split, items)
    chosen, chosen_report = choose_from_statistics(candidates, blend_statistics(per_user), len(per_user))
    report = {**chosen_report,
              "item_model": {k: tuned[k][0] for k in chosen.kinds},
              "item_models": {k: {"baseline": ITEM_MODELS[k], "settings": tuned[k][0], "settings_tried": tuned[k][2],
                                  "search_space": SEARCH_SPACES[ITEM_MODELS[k]]} for k in kinds},
              "chosen_on": "validation items: the encoder as selected before its refit, the item models fit on "
                           "the training items; the item models' settings were tuned on the same validation items "
                           "(kinds: ease = ease-recency, item-knn = item-knn-recency, popular = most-popular of "
                           "fedrec bench quality)"}
    everything = with_validation_in_train(split)
    items = {k: fit_selected(ITEM_MODELS[k], tuned[k][0], everything) for k in chosen.kinds}
    return FusedScorer(model_scorer(model), items, chosen), report


def run_centralized(job: CentralizedJob, out: Path, *, progress: bool = True) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(job.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(job.data, show_progress=progress)
    model, result = train_centralized(prepared, job, progress=progress)
    scorer, fusion = model_scorer(model), None
    if job.fusion != "none":
        scorer, fusion = fuse_with_item_model(job.fusion, model, result, prepared.split)
        alone = evaluate(model_scorer(model), prepared.split, "test")
        fusion["encoder_alone_test"] = alone.metrics
        np.save(out / "encoder_alone_test_ranks.npy", alone.ranks)
    evaluation = evaluate(scorer, prepared.split, "test", sampled_negatives=job.sampled_negatives,
                          seed=job.train.seed)
    test = evaluation.metrics
    np.save(out / "test_ranks.npy", evaluation.ranks)  # per user, for `fedrec compare`
    torch.save({"model_config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                "item_ids": list(prepared.encoded.item_ids), "content": prepared.features.matrix,
                "fusion": fusion and {k: fusion[k] for k in ("chosen", "blend", "item_model")}},
               out / "model.pt")
    bundle = write_model_bundle(
        out / "bundle", model, catalog_of(prepared.encoded.item_ids, prepared.features.matrix,
                                          prepared.dataset.catalog.frame),
        blend=scorer.blend if isinstance(scorer, FusedScorer) else ENCODER_ALONE,
        fitted=scorer.items if isinstance(scorer, FusedScorer) else None,
        popularity=item_popularity(with_validation_in_train(prepared.split)),
        run={"dataset": prepared.dataset.name, "mode": "centralized", "metrics": test, "privacy": None})
    plot_validation_curve({"centralized": result.curve}, out / "validation_curve.png",
                          title=f"{prepared.dataset.name}: validation NDCG@10 of centralized training, by epoch")
    summary = {
        "dataset": prepared.dataset.name,
        "mode": "centralized",
        "data_report": prepared.report,
        "metrics": {k: v for k, v in test.items() if not k.startswith("sampled")},
        "sampled_metrics": {"protocol": f"held-out item vs {job.sampled_negatives} uniformly "
                            "sampled unseen items (for comparison with papers; not our headline)",
                            **{k: v for k, v in test.items() if k.startswith("sampled")}},
        "tie_free_users": subset_metrics(evaluation.ranks, tie_free_users(prepared.encoded.timestamps)),
        "fusion": fusion,
        "bundle": {"path": str(out / "bundle"), "version": bundle["version"]},
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_seconds": round(result.train_seconds, 2),
        "best_epoch": result.best_epoch,
        "refit_epochs": result.refit_epochs,
        "stopped_because": result.stopped_because,
        "data": {"users": len(prepared.split), "items": prepared.split.n_items,
                 "train_interactions": int(sum(len(u.train) for u in prepared.split.users)),
                 "source": prepared.dataset.interactions.source,
                 "protocol": "temporal leave-one-out; full ranking over all items; the user's "
                             "history items excluded; validation item used for early stopping, "
                             "then trained on for refit_fraction x best epoch more epochs; test item never trained on"},
        "config": {"data": asdict(job.data), "model": asdict(job.model), "train": asdict(job.train),
                   "threads": job.threads, "text_encoder": prepared.features.text_encoder},
        "validation_curve": result.curve,
    }
    write_json(out / "summary.json", summary)
    return summary
