"""`fedrec bench quality`: baselines and our model on one split, one table, one JSON.

All methods see the same training interactions and are ranked by the same evaluator
(`fedrec.shared.evaluation.evaluate`): full ranking, the user's history excluded, test stage.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from fedrec.shared.data.pipeline import DataConfig, prepare_data
from fedrec.shared.evaluation.ranking import tie_free_users
from fedrec.shared.report import write_json
from fedrec.simulation.baselines import fused_baselines, tune_all
from fedrec.simulation.centralized import CentralizedJob, run_centralized

COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "novelty@10")
SAMPLED = 99   # negatives per user in the sampled protocol (PFedRec, FedNCF); reported beside, never instead


def run_quality_bench(job: CentralizedJob, out: Path, *, progress: bool = True, train_model: bool = True) -> dict:
    """Every baseline of simulation/baselines.py tuned on validation, an ID-only encoder (our
    encoder without content features, alone: the sequential reference), and fedrec centralized as
    `job` says. Each method writes OUT/<method>/test_ranks.npy for `fedrec compare`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(job.data, show_progress=progress)
    tie_free = tie_free_users(prepared.encoded.timestamps)
    seed = job.train.seed    # the same sampled negatives for every method
    rows = tune_all(prepared.split, out, progress=progress, sampled_negatives=SAMPLED, seed=seed, tie_free=tie_free)
    rows.append(fused_baselines(prepared.split, "ease-recency", "session-knn", out, sampled_negatives=SAMPLED,
                                seed=seed, tie_free=tie_free))
    if train_model:
        job = replace(job, sampled_negatives=SAMPLED)
        id_only = replace(job, model=replace(job.model, content=False))
        # Our encoder without content features (the sequential, SASRec-like reference) alone and
        # fused as ours is; then fedrec itself, and its encoder alone.
        # (method fused, its folder; the encoder alone, its folder)
        runs = ((id_only, "encoder-id-only + item model", "encoder-id-only-fused", "encoder-id-only",
                 "encoder-id-only"),
                (job, "fedrec-centralized", "fedrec-centralized", "fedrec-centralized, encoder alone",
                 "fedrec-encoder-alone"))
        for variant, method, folder, alone, alone_folder in runs:
            started = time.perf_counter()
            summary = run_centralized(variant, out / folder, progress=progress)
            sampled = {k: v for k, v in summary["sampled_metrics"].items() if k.startswith("sampled")}
            rows.append({"method": method, **summary["metrics"], **sampled, "settings": _model_settings(summary),
                         "tie_free_users": summary["tie_free_users"], "folder": folder,
                         "fit_seconds": round(time.perf_counter() - started, 2)})
            if summary.get("fusion"):
                (out / alone_folder).mkdir(exist_ok=True)
                shutil.copy(out / folder / "encoder_alone_test_ranks.npy", out / alone_folder / "test_ranks.npy")
                rows.append({"method": alone, **summary["fusion"]["encoder_alone_test"], "settings": {},
                             "folder": alone_folder, "fit_seconds": rows[-1]["fit_seconds"]})
    if train_model:
        _paired_ratios(rows, out)
    report = {"dataset": prepared.dataset.name, "users": len(prepared.split),
              "items": prepared.split.n_items,
              "protocol": "temporal leave-one-out, full ranking, history items excluded, ties at their expected "
                          "rank, test stage; every setting chosen on validation (fit on train), then refit on "
                          "train + validation items",
              "results": rows}
    write_json(out / "quality.json", report)
    table = format_table(rows)
    (out / "quality.md").write_text(f"# Quality on {prepared.dataset.name}\n\n{table}\n")
    print(table)
    return report


def _paired_ratios(rows: list[dict], out: Path) -> None:
    """fedrec centralized's NDCG@10 over each other method's, with the paired bootstrap interval of
    `fedrec compare` (shared/evaluation/compare.py), into each row as `fedrec_ratio`."""
    import numpy as np

    from fedrec.shared.evaluation.compare import compare_runs
    ours = np.load(out / "fedrec-centralized" / "test_ranks.npy")
    for row in rows:
        if row["method"] != "fedrec-centralized":
            theirs = np.load(out / row["folder"] / "test_ranks.npy")
            report = compare_runs([theirs], [ours])
            row["fedrec_ratio"] = {"ratio": report["ratio"], "ci95": report["ratio_ci95"]}


def _model_settings(summary: dict) -> dict:
    fusion = summary.get("fusion") or {}
    return {"content": summary["config"]["model"]["content"], "best_epoch": summary["best_epoch"],
            **({"blend": fusion["chosen"], "item_model": fusion["item_model"]} if fusion else {})}


def format_table(rows: list[dict]) -> str:
    head = ("| method | " + " | ".join(COLUMNS) + f" | ndcg@10, tie-free users | ndcg@10, {SAMPLED} sampled | "
            "fedrec / this (95% interval) | chosen on validation | fit s |")
    rule = "|---" * (len(COLUMNS) + 6) + "|"
    body = [f"| {r['method']} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS)
            + f" | {_figure(r.get('tie_free_users', {}).get('ndcg@10'))} | {_figure(r.get(f'sampled{SAMPLED}_ndcg@10'))}"
            + f" | {_ratio_text(r.get('fedrec_ratio'))} | {_settings_text(r.get('settings', {}))} | "
            f"{r['fit_seconds']:.1f} |" for r in rows]
    return "\n".join([head, rule, *body])


def _ratio_text(ratio: dict | None) -> str:
    return "-" if not ratio else f"{ratio['ratio']:.3f} ({ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f})"


def _figure(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "-"


def run_payload_bench(out: Path, *, catalog_sizes=(1_682, 10_000, 100_000), content_dim: int = 405,
                      id_buckets: int = 4096) -> dict:
    """Bytes one client receives and sends per round, by catalog size: the ArrayRecord of the
    shared weights as Flower serialises it. Beside it, what a table with one row per item
    would cost, i.e. what the bounded (hashed) ID table saves."""
    import torch

    from fedrec.shared.model.config import ModelConfig
    from fedrec.shared.model.recommender import RecommenderModel, shared_weights
    from fedrec.shared.protocol import to_record

    rows = []
    for n_items in catalog_sizes:
        cfg = ModelConfig(n_items=n_items, content_dim=content_dim, max_len=50, id_buckets=id_buckets)
        weights = shared_weights(RecommenderModel(cfg, torch.zeros(n_items + 1, content_dim)))
        record = to_record(weights)
        per_item = (n_items + 1) * cfg.dim * 4
        bounded = weights["item_tower.id_table"].nbytes
        rows.append({"items": n_items, "parameters": int(sum(v.size for v in weights.values())),
                     "bytes_per_direction": record.count_bytes(),
                     "id_table_bytes": bounded,
                     "bytes_if_one_row_per_item": record.count_bytes() - bounded + per_item})
    report = {"id_buckets": id_buckets, "content_dim": content_dim,
              "note": "per client per round, each direction (global weights down, delta up), float32",
              "results": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "payload.json", report)
    table = "\n".join(["| items | parameters | bytes per direction | of which ID table | with one row per item |",
                       "|---|---|---|---|---|"] +
                      [f"| {r['items']:,} | {r['parameters']:,} | {r['bytes_per_direction']:,} | "
                       f"{r['id_table_bytes']:,} | {r['bytes_if_one_row_per_item']:,} |" for r in rows])
    (out / "payload.md").write_text(f"# Bytes per client-round\n\n{table}\n")
    print(table)
    return report


def run_secagg_bench(data: DataConfig, out: Path, *, clients_per_round: int = 100, rounds: int = 6,
                     settings: dict | None = None) -> dict:
    """Round time and bytes with and without secure aggregation, measured side by side in
    one simulation: plain and secure rounds alternate on the same clients (each pair uses the
    same round number, so the same sample and the same local training)."""
    from flwr.serverapp import ServerApp

    from fedrec.client.app import make_client_app
    from fedrec.server.aggregation import ServerOptimizer
    from fedrec.server.app import federation_config, initial_weights
    from fedrec.server.federation import FedRecStrategy, train_round, wait_for_nodes
    from fedrec.shared.settings import run_config_defaults
    from fedrec.simulation.federated import simulate, write_store

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(data, show_progress=False)
    store = write_store(prepared, out / "store")
    settings = {**run_config_defaults(), "store": str(store), "out": str(out), "clients-per-round": clients_per_round,
                "rounds": rounds, **(settings or {})}
    rows: list[dict] = []
    app = ServerApp()

    @app.main()
    def main_(grid, context):
        cfg = federation_config(settings)
        start = initial_weights(store / "catalog.npz", cfg)
        strategy = FedRecStrategy(cfg, ServerOptimizer(start, cfg.server))
        wait_for_nodes(grid, len(prepared.split), cfg.wait_for_nodes_s)
        for server_round in range(1, rounds + 1):
            for mode in ("plain", "secure"):
                strategy.optimizer = ServerOptimizer(start, cfg.server)
                record = train_round(grid, strategy, server_round, secure=mode == "secure")
                rows.append({"round": server_round, "mode": mode, "seconds": record.seconds,
                             "accepted": record.accepted, "bytes_down": record.bytes_down,
                             "bytes_up": record.bytes_up_mean, "phases": record.phase_seconds,
                             "secagg": record.metrics.get("secagg")})
                print(f"round {server_round} {mode}: {record.seconds:.2f} s, {record.accepted} clients, "
                      f"{record.bytes_down:,} B down / {record.bytes_up_mean:,.0f} B up per client", flush=True)

    simulate(app, make_client_app(settings), len(prepared.split))
    return _secagg_report(rows, prepared.dataset.name, len(prepared.split), clients_per_round, out)


def _secagg_report(rows: list[dict], dataset: str, nodes: int, clients_per_round: int, out: Path) -> dict:
    """secagg.json and secagg.md from the alternating plain/secure rounds."""
    import numpy as np
    measured = [r for r in rows if r["round"] > 1]  # round 1 starts Ray's workers
    summary = {}
    for mode in ("plain", "secure"):
        mine = [r for r in measured if r["mode"] == mode]
        summary[mode] = {"round_seconds_mean": float(np.mean([r["seconds"] for r in mine])),
                         "bytes_down_per_client": float(np.mean([r["bytes_down"] for r in mine])),
                         "bytes_up_per_client": float(np.mean([r["bytes_up"] for r in mine]))}
    ratio = {k: summary["secure"][k] / summary["plain"][k] for k in summary["plain"]}
    registration = [r["phases"].get("register", 0.0) for r in rows if r["mode"] == "secure"][0]
    report = {"dataset": dataset, "clients_per_round": clients_per_round,
              "rounds_measured": len(measured) // 2, "secagg": rows[-1]["secagg"],
              "registration_seconds": registration,  # once per run: every node's identity key
              "plain": summary["plain"], "secure": summary["secure"], "ratio_secure_over_plain": ratio,
              "rounds": rows}
    write_json(out / "secagg.json", report)
    table = "\n".join([
        "| | round s | bytes down / client | bytes up / client |", "|---|---|---|---|",
        *[f"| {m} | {summary[m]['round_seconds_mean']:.2f} | {summary[m]['bytes_down_per_client']:,.0f} | "
          f"{summary[m]['bytes_up_per_client']:,.0f} |" for m in ("plain", "secure")],
        f"| secure / plain | {ratio['round_seconds_mean']:.2f}x | {ratio['bytes_down_per_client']:.3f}x | "
        f"{ratio['bytes_up_per_client']:.3f}x |"])
    table += (f"\n\nOnce per run, before the first secure round: registering {nodes} nodes' "
              f"identity keys, {registration:.1f} s (in round 1, left out above with Ray's start).")
    (out / "secagg.md").write_text(f"# Secure aggregation overhead, {clients_per_round} clients a round\n\n{table}\n")
    print(table)
    return report
