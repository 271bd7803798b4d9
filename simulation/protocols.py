"""`fedrec bench held-out`: the held-out-user protocol of the federated literature, beside ours.

A share of the users (15% by default, drawn with the seed) never trains: not the encoder, not the
item models, not the baselines, not the item features (popularity and recency are counted over
the training users only). Each held-out user's history (everything but the last item) is the
query and the last item the target, ranked over the full catalog with the history excluded. Our
model has no per-user parameters, so it scores a user it has never seen, as a new device would.
GPT-FedRec (2024) reports ML-100K this way (0.0621 NDCG@10 with its own split and filtering,
so the figures compare in kind, not to the digit).

What still touches the held-out users: the data filters that run before the users are split
(`--item-core`, `--rated-items-only`; both off by default), and the defaults themselves, which
were chosen on ML-100K with every user. Training users' events may be later than a held-out
user's test event (no global time cutoff).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from shared.data.datasets import cache_dir
from shared.data.features import build_features
from shared.data.pipeline import prepare_data
from shared.data.preprocess import Split, item_activity, with_validation_in_train
from shared.evaluation.ranking import evaluate
from shared.model.training import model_scorer
from shared.report import write_json
from simulation.baselines import SEARCH_SPACES, fit_selected, select
from simulation.centralized import CentralizedJob, fuse_with_item_model, train_centralized

COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10")


def split_held_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(the training users, the held-out users): a seeded random `fraction` of the users."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(split), dtype=bool)
    held[rng.choice(len(split), size=max(1, round(fraction * len(split))), replace=False)] = True
    users = np.array(split.users, dtype=object)
    return Split(list(users[~held]), split.n_items), Split(list(users[held]), split.n_items)


def run_held_out_bench(job: CentralizedJob, out: Path, *, fraction: float = 0.15, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(replace(job.data, activity_features=False), show_progress=progress)
    training, held_out = split_held_out(prepared.split, fraction, job.data.seed)
    rows = []
    for name in SEARCH_SPACES:
        settings, valid, _ = select(name, training)
        model = fit_selected(name, settings, with_validation_in_train(training))
        rows.append({"method": name, **evaluate(model, held_out, "test").metrics, "settings": settings})
        if progress:
            print(f"{name}: held-out NDCG@10 {rows[-1]['ndcg@10']:.4f} with {settings}", flush=True)
    # Item features from the training users only: the held-out users' events must not shape them.
    activity = item_activity(training) if job.data.activity_features else None
    features = build_features(prepared.dataset.catalog, activity, text_encoder=job.data.text_encoder,
                              cache_dir=cache_dir() / "features")
    ours = replace(prepared, split=training, features=features)
    model, result = train_centralized(ours, job, progress=progress)
    scorer, fusion = ((model_scorer(model), None) if job.fusion == "none"
                      else fuse_with_item_model(job.fusion, model, result, training))
    rows.append({"method": "fedrec-centralized", **evaluate(scorer, held_out, "test").metrics,
                 "settings": {"fusion": job.fusion, **({"item_model": fusion["item_model"], "weight": fusion["weight"]}
                                                       if fusion else {})}})
    report = {"dataset": prepared.dataset.name, "protocol": f"held-out users: {len(held_out)} of {len(prepared.split)} "
              f"users ({fraction:.0%}, seed {job.data.seed}) never train; history = all but their last item, target = "
              "the last; full ranking, history excluded; settings chosen on the training users' validation items; "
              "data filters (item core, rated items only) ran before the split, and training users' events may be "
              "later than a held-out user's test event",
              "training_users": len(training), "held_out_users": len(held_out), "results": rows}
    write_json(out / "held_out.json", report)
    lines = [f"# Held-out users: {prepared.dataset.name}", "", report["protocol"], "",
             "| method | " + " | ".join(COLUMNS) + " | settings |", "|---" * (len(COLUMNS) + 2) + "|"]
    lines += [f"| {r['method']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS) + f" | {r['settings']} |"
              for r in rows]
    (out / "held_out.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    return report

