"""Differential privacy benchmarks.

`run_dp_speed_bench`: local training with DP-SGD (Opacus, record level) against the same
local training without it. It uses the same model, the same user logs and one thread, as a
virtual client has, on synthetic catalogs of several sizes. The two are timed alternately in
one process, so the ratios compare like with like on a shared, noisy machine.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fedrec.shared.report import write_json


def run_dp_speed_bench(out: Path, *, catalog_sizes=(1_682, 50_000), content_dim: int = 405,
                       log_lengths=(50, 100, 200), repeats: int = 5, noise_multiplier: float = 3.0,
                       progress: bool = True) -> dict:
    import torch

    from fedrec.client.local import local_update
    from fedrec.client.privacy import DPStep, PrivacyLedger, RecordPrivacy
    from fedrec.client.store import UserLog, start_ledger
    from fedrec.shared.model.config import ModelConfig
    from fedrec.shared.model.recommender import RecommenderModel, shared_weights
    from fedrec.shared.protocol import LocalConfig
    from fedrec.shared.settings import default

    torch.set_num_threads(1)
    local = LocalConfig()   # the shipped defaults
    privacy = RecordPrivacy(noise_multiplier, clip=1.0, window=default("record-window"), budget=math.inf, delta=1e-5)
    rows = []
    for n_items in catalog_sizes:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        content = torch.from_numpy(rng.standard_normal((n_items + 1, content_dim)).astype(np.float32))
        model = RecommenderModel(ModelConfig(n_items=n_items, content_dim=content_dim), content)
        weights = shared_weights(model)
        for length in log_lengths:
            user = UserLog(rng.integers(1, n_items + 1, size=length), 1, 2)
            ledger_file = Path(tempfile.mkdtemp()) / "ledger.json"
            start_ledger(ledger_file)
            ledger = PrivacyLedger(ledger_file)
            plain_s, private_s = [], []
            for rep in range(repeats + 1):   # the first pair warms up and is not counted
                t = time.perf_counter()
                local_update(model, weights, user, local, rng)
                plain = time.perf_counter() - t
                t = time.perf_counter()
                local_update(model, weights, user, local, rng, DPStep(privacy, ledger, local.local_epochs, local.optimizer))
                private = time.perf_counter() - t
                if rep:
                    plain_s.append(plain)
                    private_s.append(private)
            row = {"items": n_items, "log_length": length,
                   "plain_s": statistics.median(plain_s), "private_s": statistics.median(private_s)}
            row["ratio"] = row["private_s"] / row["plain_s"]
            rows.append(row)
            if progress:
                print(f"{n_items:>7,} items, log of {length:>3}: plain {row['plain_s'] * 1e3:7.1f} ms, "
                      f"private {row['private_s'] * 1e3:7.1f} ms, ratio {row['ratio']:.2f}x", flush=True)
    return _dp_speed_report(rows, catalog_sizes, content_dim, repeats, Path(out))


def _dp_speed_report(rows: list[dict], catalog_sizes, content_dim: int, repeats: int, out: Path) -> dict:
    summary = {}
    for n_items in catalog_sizes:
        mine = [r for r in rows if r["items"] == n_items]
        summary[str(n_items)] = sum(r["private_s"] for r in mine) / sum(r["plain_s"] for r in mine)
    report = {"what": "one client's local training, one round: DP-SGD (record level) vs plain; "
                      "median of alternating repeats; one thread",
              "content_dim": content_dim, "repeats": repeats, "rows": rows,
              "ratio_by_items": summary}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dp_speed.json", report)
    lines = ["# DP-SGD vs plain local training", "",
             "| items | log length | plain ms | private ms | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['items']:,} | {r['log_length']} | {r['plain_s'] * 1e3:.1f} | {r['private_s'] * 1e3:.1f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    lines += ["", "Total over the three logs, private / plain: " +
              ", ".join(f"{int(k):,} items {v:.2f}x" for k, v in summary.items())]
    (out / "dp_speed.md").write_text("\n".join(lines) + "\n")
    return report


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_privacy_sweep(job, out: Path, *, epsilons=(1.0, 2.0, 4.0, 8.0, math.inf), modes=("record", "user"),
                      canaries: int = 500, progress: bool = True) -> dict:
    """Privacy-utility sweep with a membership-inference audit on the same runs.

    One federated run per (mode, epsilon), plus one without DP, on the same data with the
    same canaries in it (simulation/audit.py: 2 x `canaries`, each in a user's log with probability
    1/2). For each: test NDCG@10/HR@10, the epsilon spent, the canary attack's AUC beside the
    bound that epsilon allows, and the one-run audit's empirical epsilon lower bound. Runs already
    finished in `out` are read back, not redone (a stopped sweep resumes)."""
    import json
    from dataclasses import replace

    from fedrec.shared.data.pipeline import prepare_data
    from fedrec.shared.settings import default
    from fedrec.simulation.audit import insert_canaries, make_canaries
    from fedrec.simulation.federated import run_federated

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(job.data, show_progress=progress)
    window = int(job.settings.get("record-window", default("record-window")))
    delta = float(job.settings.get("delta", default("delta")))
    marks = make_canaries(prepared.split.n_items, len(prepared.split), canaries, window, seed=job.data.seed,
                          independent=True)
    with_canaries = replace(prepared, split=insert_canaries(prepared.split, marks))
    rows = []
    for mode, eps in [("none", math.inf)] + [(m, e) for m in modes for e in epsilons]:
        run_dir = out / f"{mode}-eps{_eps_label(eps)}"
        if not (run_dir / "summary.json").exists():
            if progress:
                print(f"--- privacy {mode}, epsilon {_eps_label(eps)} -> {run_dir}", flush=True)
            # No stopping rule: DP devices refuse validation, so only the reference run could stop on it.
            settings = {**job.settings, "privacy": mode, "target-epsilon": eps, "federated-patience": 0}
            if mode == "none":  # the reference run has no noise to distribute
                settings["distributed-noise"] = False
            run_federated(replace(job, settings=settings), run_dir, progress=progress, prepared=with_canaries)
        summary = json.loads((run_dir / "summary.json").read_text())
        losses = _canary_losses(torch_load(run_dir / "final.pt"), marks, with_canaries, job)
        rows.append(_sweep_row(mode, eps, summary, losses, marks.member, delta))
        if progress:
            r = rows[-1]
            print(f"{mode:>6} eps {r['target_epsilon']:>4}: NDCG@10 {r['ndcg@10']:.4f}  attack AUC "
                  f"{r['attack_auc']:.3f} (bound {r['auc_bound']:.3f}), empirical epsilon >= "
                  f"{r['epsilon_lower_bound']:.2f}", flush=True)
    return _sweep_report(rows, prepared.dataset.name, job.settings, delta, canaries, window, out)


def _canary_losses(final: dict, marks, prepared, job) -> np.ndarray:
    """The attack's score per canary (lower: more likely trained on): the encoder's next-item loss,
    or for the DP item-item model minus the weight of the canary's pair."""
    from fedrec.shared.model.recommender import load_weights
    from fedrec.simulation.audit import canary_losses
    from fedrec.simulation.centralized import build_model
    if "item_item" in final:
        weights, a, b = np.asarray(final["item_item"]), marks.sequences[:, 0], marks.sequences[:, 1]
        return -(weights[a, b] + weights[b, a])
    model = build_model(prepared, job.model)
    load_weights(model, final["weights"])
    return canary_losses(model, marks)


def _sweep_row(mode: str, eps: float, summary: dict, losses: np.ndarray, member: np.ndarray, delta: float) -> dict:
    from fedrec.simulation.audit import attack_auc, auc_bound, epsilon_lower_bound
    audit = epsilon_lower_bound(losses, member, delta)
    spent = summary["privacy"].get("epsilon")
    if isinstance(spent, dict):
        spent = max((v for v in spent.values() if v is not None), default=None)
    return {"mode": mode, "target_epsilon": _eps_label(eps),
            "epsilon": None if spent is None or math.isinf(spent) else spent,
            "noise_multiplier": summary["privacy"].get("noise_multiplier"),
            "ndcg@10": summary["metrics"]["ndcg@10"], "hr@10": summary["metrics"]["hr@10"],
            "attack_auc": attack_auc(losses, member), "auc_bound": auc_bound(eps, delta),
            "epsilon_lower_bound": audit["epsilon_lower_bound"], "audit": audit, "wall_seconds": summary["wall_seconds"],
            "schedule": summary.get("schedule")}


def _sweep_report(rows: list[dict], dataset: str, settings: dict, delta: float, canaries: int, window: int,
                  out: Path) -> dict:
    """privacy.json, privacy.md and privacy.png from the sweep's rows (the first one without DP)."""
    baseline = rows[0]["ndcg@10"]
    for r in rows:
        r["ndcg_vs_non_private"] = r["ndcg@10"] / baseline if baseline else None
    schedule = rows[0].get("schedule") or {}   # what the runs chose where the settings left it to the schedule
    report = {"dataset": dataset, "rounds": settings.get("rounds") or schedule.get("rounds"),
              "clients_per_round": settings.get("clients-per-round") or schedule.get("clients_per_round"), "delta": delta,
              "noise": ("distributed (the item-item release)" if settings.get("private-model", "item-item") == "item-item"
                        else "distributed" if settings.get("distributed-noise") else "local (record) / server (user)"),
              "canaries": {"count": 2 * canaries, "membership": "each in a user's log with probability 1/2",
                           "window": window, "attack": "next-item loss on the canary, lower = member",
                           "lower_bound": "one-run audit (Steinke, Nasr & Jagielski 2023), 95% confidence"},
              "rows": rows}
    write_json(out / "privacy.json", report)
    lines = [f"# Privacy-utility sweep: {report['dataset']}, {report['rounds']} rounds, "
             f"{report['clients_per_round']} clients a round, delta {delta:g}, noise {report['noise']}", "",
             "| mode | target epsilon | empirical epsilon >= | noise multiplier | NDCG@10 | vs no DP | HR@10 | "
             "attack AUC | AUC bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        noise = r["noise_multiplier"]
        noise = "-" if noise is None else (f"{noise:.3g}" if not isinstance(noise, dict) else
                                           ", ".join(f"{k} {v:.3g}" for k, v in noise.items()))
        lines.append(f"| {r['mode']} | {r['target_epsilon']} | {r['epsilon_lower_bound']:.2f} | {noise} | {r['ndcg@10']:.4f} | "
                     f"{r['ndcg_vs_non_private']:.0%} | {r['hr@10']:.4f} | {r['attack_auc']:.3f} | {r['auc_bound']:.3f} |")
    (out / "privacy.md").write_text("\n".join(lines) + "\n")
    plot_privacy(report, out / "privacy.png")
    return report


def torch_load(path: Path) -> dict:
    import torch
    return torch.load(path, weights_only=False)


def plot_privacy(report: dict, path: Path) -> None:
    """NDCG@10 against epsilon per mode (no-DP level dashed), and the attack's AUC against
    the bound each epsilon allows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [e for e in dict.fromkeys(r["target_epsilon"] for r in rows if r["mode"] != "none")]
    x = {e: i for i, e in enumerate(labels)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, colour in (("record", "tab:blue"), ("user", "tab:orange")):
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            left.plot([x[r["target_epsilon"]] for r in mine], [r["ndcg@10"] for r in mine], "o-",
                      color=colour, label=f"{mode} level")
            right.plot([x[r["target_epsilon"]] for r in mine], [r["attack_auc"] for r in mine], "o-",
                       color=colour, label=f"attack AUC, {mode} level")
    base = rows[0]
    left.axhline(base["ndcg@10"], color="grey", ls="--", label="no DP")
    bound = {r["target_epsilon"]: r["auc_bound"] for r in rows if r["mode"] != "none"}
    right.plot([x[e] for e in labels], [bound[e] for e in labels], "k:", label="bound at epsilon")
    right.axhline(0.5, color="grey", lw=0.8)
    right.axhline(base["attack_auc"], color="grey", ls="--", label="attack AUC, no DP")
    for ax, title in ((left, "test NDCG@10"), (right, "membership inference on canaries")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("target epsilon")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['dataset']}: privacy vs utility ({report['rounds']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_dp_items_bench(data, out: Path, *, epsilons=(1.0, 4.0, 8.0, math.inf), seeds=(0, 1, 2), delta: float = 1e-5,
                       canaries: int = 500, progress: bool = True) -> dict:
    """The user-level DP item-item model (shared/privacy/cooccurrence.py) against most-popular and
    the same model without noise, on one split: for each epsilon and seed one noisy release, the
    ridge and recency decay chosen on validation, test NDCG@10; and a one-run audit of one release
    per epsilon with canaries in the logs (each in with probability 1/2). The noise is calibrated
    by the PRV accountant for one Gaussian mechanism (sampling rate 1, one step)."""

    from fedrec.shared.data.pipeline import prepare_data
    from fedrec.shared.evaluation.baselines import MostPopular
    from fedrec.shared.evaluation.ranking import evaluate
    from fedrec.shared.privacy.accounting import noise_for
    from fedrec.shared.privacy.cooccurrence import SENSITIVITY, ease_weights, release, symmetric
    from fedrec.simulation.audit import epsilon_lower_bound, insert_canaries, make_canaries

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(data, show_progress=progress)
    split, n = prepared.split, prepared.split.n_items
    popular = evaluate(MostPopular().fit(split), split, "test").metrics
    rows = []
    for eps in epsilons:
        multiplier = 0.0 if math.isinf(eps) else noise_for(eps, delta, 1.0, 1, "prv")
        for seed in seeds:
            upper = release([u.train for u in split.users], n, multiplier * SENSITIVITY, np.random.default_rng(seed))
            rows.append({"epsilon": _eps_label(eps), "seed": seed, "noise_multiplier": multiplier,
                         **_tuned_item_item(symmetric(upper, n), split, multiplier * SENSITIVITY)})
            if progress:
                print(f"eps {_eps_label(eps):>4} seed {seed}: test NDCG@10 {rows[-1]['ndcg@10']:.4f} "
                      f"(l2 {rows[-1]['l2']:g}, decay {rows[-1]['decay']:g})", flush=True)
        # The audit: canaries (a, b, a, b, ...) in the logs; the attacker scores each by B[a, b] + B[b, a].
        marks = make_canaries(n, len(split), canaries, 11, seed=7, independent=True)
        audited = insert_canaries(split, marks)
        upper = release([u.train for u in audited.users], n, multiplier * SENSITIVITY, np.random.default_rng(99))
        weights = ease_weights(symmetric(upper, n), rows[-1]["l2"])
        a, b = marks.sequences[:, 0], marks.sequences[:, 1]
        audit = epsilon_lower_bound(-(weights[a, b] + weights[b, a]), marks.member, delta)
        for r in rows[-len(seeds):]:
            r["epsilon_lower_bound"] = audit["epsilon_lower_bound"]
    return _dp_items_report(rows, popular, prepared.dataset.name, delta, out)


def _tuned_item_item(G: np.ndarray, split, noise_std: float) -> dict:
    """EASE on G with the ridge and the recency decay that score best on validation, blended with
    the release's popularity as shipped (popularity_weight); test metrics."""
    from fedrec.shared.evaluation.ranking import evaluate
    from fedrec.shared.privacy.cooccurrence import ItemItemScorer, ease_weights, popularity, popularity_weight
    best, counts, blend = None, popularity(G), popularity_weight(noise_std)
    for l2 in (30.0, 100.0, 300.0, 1000.0, 3000.0):
        weights = ease_weights(G, l2)
        for decay in (1.0, 0.9, 0.8):
            valid = evaluate(ItemItemScorer(weights, decay, counts, blend), split, "valid").metrics["ndcg@10"]
            if best is None or valid > best[0]:
                best = (valid, l2, decay, weights)
    test = evaluate(ItemItemScorer(best[3], best[2], counts, blend), split, "test").metrics
    return {"l2": best[1], "decay": best[2], "valid_ndcg@10": best[0], "ndcg@10": test["ndcg@10"],
            "hr@10": test["hr@10"], "coverage@10": test.get("coverage@10")}


def _dp_items_report(rows: list[dict], popular: dict, dataset: str, delta: float, out: Path) -> dict:
    by_eps: dict[str, list[dict]] = {}
    for r in rows:
        by_eps.setdefault(r["epsilon"], []).append(r)
    summary = [{"epsilon": eps, "ndcg@10_mean": float(np.mean([r["ndcg@10"] for r in rs])),
                "ndcg@10_sd": float(np.std([r["ndcg@10"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                "vs_most_popular": float(np.mean([r["ndcg@10"] for r in rs])) / popular["ndcg@10"],
                "epsilon_lower_bound": rs[0].get("epsilon_lower_bound"), "noise_multiplier": rs[0]["noise_multiplier"]}
               for eps, rs in by_eps.items()]
    report = {"dataset": dataset, "delta": delta, "unit": "one user (covers each record and interaction)",
              "accountant": "prv, one Gaussian release", "most_popular_ndcg@10": popular["ndcg@10"],
              "summary": summary, "rows": rows}
    write_json(out / "dp_items.json", report)
    lines = [f"# User-level DP item-item model (one noisy co-occurrence sum): {dataset}, delta {delta:g}", "",
             f"most-popular test NDCG@10: {popular['ndcg@10']:.4f}", "",
             "| epsilon | noise multiplier | test NDCG@10 (mean, sd over seeds) | vs most-popular | "
             "empirical epsilon >= |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['epsilon']} | {s['noise_multiplier']:.3g} | {s['ndcg@10_mean']:.4f} ({s['ndcg@10_sd']:.4f}) | "
                     f"{s['vs_most_popular']:.2f}x | {s['epsilon_lower_bound']:.2f} |")
    (out / "dp_items.md").write_text("\n".join(lines) + "\n")
    return report
