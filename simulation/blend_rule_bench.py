"""`fedrec bench blend-rule`: which rule should pick the blend from a few hundred devices' validation?

A federated run chooses its blend (shared/model/fusion.py) from one secure sum of `blend-devices`
(200) devices' validation NDCG@10 under every candidate. The best of 38 on 200 users is partly the
luckiest, and the rule decides how much to trust it. This bench judges each rule of `BLEND_RULES`
the way a run meets it, on validation only (never on test): the encoder is trained centrally for
several epoch counts (a weak to a converged encoder, as a federated one is after few or many
rounds); for each, every user's validation NDCG@10 under every candidate is computed once; then,
many times over, a rule picks from `picks` random users and the pick is scored on the other
users. Writes blend-rule.json and blend-rule.md.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedrec.shared.data.pipeline import prepare_data
from fedrec.shared.model.fusion import BLEND_KINDS, BLEND_RULES, blend_statistics, paired_moments
from fedrec.shared.report import write_json
from fedrec.simulation.centralized import CentralizedJob, train_centralized, tuned_item_models, validation_blend_ndcg


def run_blend_rule_bench(job: CentralizedJob, out: Path, *, epochs: tuple[int, ...], picks: int, draws: int,
                         progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(job.data, show_progress=progress)
    _, items = tuned_item_models(prepared.split, BLEND_KINDS)      # the same for every encoder
    encoders = []
    for count in epochs:
        trained = dataclasses.replace(job, train=dataclasses.replace(job.train, epochs=count))
        model, result = train_centralized(prepared, trained, progress=progress)
        candidates, per_user = validation_blend_ndcg(model, result, prepared.split, items)
        np.save(out / f"valid-blend-ndcg-{count}-epochs.npy", per_user)
        encoders.append({"epochs": count, **rule_outcomes(candidates, per_user, picks, draws, job.train.seed)})
        print(f"{count} epochs: " + ", ".join(f"{r} {v['held_out_ndcg@10']:.4f}" for r, v in encoders[-1]["rules"].items()),
              flush=True)
    report = {"dataset": job.data.dataset, "last_events": job.data.last_events, "picks": picks, "draws": draws,
              "seed": job.train.seed, "encoders": encoders,
              "how": "per encoder: every user's validation NDCG@10 under each candidate; per draw: a rule picks "
                     "from `picks` random users' summed statistics, its pick is scored on the other users"}
    write_json(out / "blend-rule.json", report)
    (out / "blend-rule.md").write_text(blend_rule_table(report))
    print(blend_rule_table(report))
    return report


def random_splits(users: int, draws: int, seed: int) -> list[np.ndarray]:
    """`draws` random orders of the users (the first `picks` of each choose, the rest score)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(users) for _ in range(draws)]


def rule_outcomes(candidates: list, per_user: np.ndarray, picks: int, draws: int, seed: int,
                  orders: list[np.ndarray] | None = None) -> dict:
    """Each rule's mean held-out validation NDCG@10 over `draws` splits of the users into `picks`
    that choose and the rest that score (`orders`, else `random_splits`), beside the best candidate
    on the rest (the oracle, out of reach: itself the best of 38), with how often the pick drops
    the encoder."""
    users, k = per_user.shape
    picks = min(picks, users - 1)
    orders = random_splits(users, draws, seed) if orders is None else orders
    draws = len(orders)
    held = {rule: np.zeros(draws) for rule in BLEND_RULES}
    dropped = {rule: 0 for rule in BLEND_RULES}
    oracle = np.zeros(draws)
    for d, order in enumerate(orders):
        chooser, rest = per_user[order[:picks]], per_user[order[picks:]].mean(axis=0)
        means, se = paired_moments(blend_statistics(chooser), picks, k)
        oracle[d] = rest.max()
        for rule, pick in BLEND_RULES.items():
            i = pick(candidates, means, se)
            held[rule][d] = rest[i]
            dropped[rule] += not candidates[i].encoder
    whole = per_user.mean(axis=0)
    return {"users": users, "oracle_ndcg@10": float(oracle.mean()),
            "best_on_all_users": candidates[int(np.argmax(whole))].label,
            "encoder_alone_ndcg@10": float(whole[0]),
            "rules": {rule: {"held_out_ndcg@10": float(v.mean()), "x_oracle": float(v.mean() / oracle.mean()),
                             "worst_5pct": float(np.quantile(v / oracle, 0.05)),
                             "drops_encoder": dropped[rule] / draws} for rule, v in held.items()}}


def blend_rule_table(report: dict) -> str:
    rules = list(BLEND_RULES)
    lines = [f"# Blend rules on {report['dataset']}"
             + (f" (newest {report['last_events']} events a user)" if report.get("last_events") else "")
             + f": pick on {report['picks']} users' validation, score on the rest, {report['draws']} draws", "",
             "Each cell: mean held-out validation NDCG@10 / x the best candidate on the held-out users (5th "
             "percentile) / share of draws whose pick drops the encoder.", "",
             "| epochs | encoder alone | best on all users | " + " | ".join(rules) + " |",
             "|---" * (3 + len(rules)) + "|"]
    for e in report["encoders"]:
        cells = [f"{v['held_out_ndcg@10']:.4f} / {v['x_oracle']:.3f} ({v['worst_5pct']:.3f}) / {v['drops_encoder']:.0%}"
                 for v in (e["rules"][r] for r in rules)]
        lines.append(f"| {e['epochs']} | {e['encoder_alone_ndcg@10']:.4f} | {e['best_on_all_users']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
